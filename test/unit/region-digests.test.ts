// The secondary's half of a checksum resync: digests of the regions that may hold data, none
// for those never written (and no read of them), and an answer cut short after 16 MiB read.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { listRegionDigests, regionDigest } from '../../sidecar/src/replication/resync';
import { AllocationMap } from '../../sidecar/src/store/allocation-map';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';

const KiB = 1024;
const MiB = 1024 * KiB;
const R = 64 * KiB;
const SIZE = 64 * MiB;

function listedRegions(listed: Buffer, first: number, count: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < count; i++) if ((listed[i >> 3] >> (i & 7)) & 1) out.push(first + i);
  return out;
}

describe('region digests for a checksum resync', () => {
  let dir: string;
  let dataFile: string;
  const devices: FileBlockDevice[] = [];
  const open = (map: AllocationMap) => {
    const dev = new FileBlockDevice(fs.openSync(dataFile, 'r+'), SIZE, false, dataFile, map);
    devices.push(dev);
    return dev;
  };
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lockstep-digests-'));
    dataFile = path.join(dir, 'data.img');
    fs.writeFileSync(dataFile, '');
    fs.truncateSync(dataFile, SIZE);
  });
  afterEach(() => {
    for (const d of devices.splice(0)) d.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('lists only regions that may hold data, with their digests', async () => {
    const dev = open(AllocationMap.fresh(SIZE));
    await dev.write(3 * R + 100, Buffer.alloc(10, 0x11), false);
    await dev.write(100 * R, Buffer.alloc(2 * R, 0x22), false);
    const answer = await listRegionDigests(dev, R, 2, 200);
    expect(answer.endRegion).toBe(202);
    expect(listedRegions(answer.listed, 2, 200)).toEqual([3, 100, 101]);
    const region = (r: number) => {
      const buf = Buffer.alloc(R);
      const fd = fs.openSync(dataFile, 'r');
      fs.readSync(fd, buf, 0, R, r * R);
      fs.closeSync(fd);
      return regionDigest(buf);
    };
    expect(answer.digests).toEqual(Buffer.concat([region(3), region(100), region(101)]));
  });

  it('stops after 16 MiB read, and reads every region where what was written is unknown', async () => {
    const known = open(AllocationMap.fresh(SIZE));
    await known.write(MiB, Buffer.alloc(40 * MiB, 0x33), false);
    const cut = await listRegionDigests(known, R, 0, 1024);
    expect(cut.endRegion).toBe(16 + 256); // 16 MiB of data, from region 16
    expect(listedRegions(cut.listed, 0, 1024)).toEqual(
      Array.from({ length: 256 }, (_, i) => 16 + i),
    );
    expect(cut.digests.length).toBe(256 * 16);

    const unknown = open(AllocationMap.unknown(SIZE));
    const all = await listRegionDigests(unknown, R, 0, 1024);
    expect(all.endRegion).toBe(256);
    expect(listedRegions(all.listed, 0, 1024)).toHaveLength(256);
  });
});
