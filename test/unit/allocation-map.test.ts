// The allocation map: exact while served, trusted after a clean stop only if the data file is
// untouched, consumed when loaded; scans read written extents and skip the rest.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AllocationMap, EXTENT_BYTES } from '../../sidecar/src/store/allocation-map';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';

const MiB = 1024 * 1024;

describe('allocation map', () => {
  let dir: string;
  let dataFile: string;
  let mapFile: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lockstep-alloc-'));
    dataFile = path.join(dir, 'data.img');
    mapFile = path.join(dir, 'allocation.map');
    fs.writeFileSync(dataFile, '');
    fs.truncateSync(dataFile, 4 * MiB);
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('knows exactly which extents were written', () => {
    const map = AllocationMap.fresh(4 * MiB);
    expect(map.mayHoldData(0, 4 * MiB)).toBe(false);
    map.markWritten(EXTENT_BYTES * 3 - 1, 2); // straddles extents 2 and 3
    expect(map.mayHoldData(0, 2 * EXTENT_BYTES)).toBe(false);
    expect(map.mayHoldData(2 * EXTENT_BYTES, 1)).toBe(true);
    expect(map.mayHoldData(3 * EXTENT_BYTES, 1)).toBe(true);
    expect(map.mayHoldData(4 * EXTENT_BYTES, 4 * MiB - 4 * EXTENT_BYTES)).toBe(false);
    expect(AllocationMap.unknown(4 * MiB).mayHoldData(0, 1)).toBe(true);
  });

  it('is trusted after a clean save only while the data file is untouched, and is consumed on load', async () => {
    const map = AllocationMap.fresh(4 * MiB);
    map.markWritten(MiB, 4096);
    await map.save(mapFile, dataFile);
    const loaded = AllocationMap.load(mapFile, dataFile, 4 * MiB);
    expect(loaded.known).toBe(true);
    expect(loaded.mayHoldData(MiB, 1)).toBe(true);
    expect(loaded.mayHoldData(0, MiB)).toBe(false);
    // Consumed: a crash after this start leaves no map to trust.
    expect(fs.existsSync(mapFile)).toBe(false);
    expect(AllocationMap.load(mapFile, dataFile, 4 * MiB).known).toBe(false);

    // Changed behind the agent's back while it was stopped: not trusted.
    await loaded.save(mapFile, dataFile);
    const later = new Date(Date.now() + 5_000);
    fs.utimesSync(dataFile, later, later);
    expect(AllocationMap.load(mapFile, dataFile, 4 * MiB).known).toBe(false);
  });

  it('is unknown when the saved map is corrupt or for another size', async () => {
    const map = AllocationMap.fresh(4 * MiB);
    await map.save(mapFile, dataFile);
    expect(AllocationMap.load(mapFile, dataFile, 8 * MiB).known).toBe(false);
    await map.save(mapFile, dataFile);
    fs.writeFileSync(mapFile, fs.readFileSync(mapFile, 'utf8').replace('"bits":"', '"bits":"A'));
    expect(AllocationMap.load(mapFile, dataFile, 4 * MiB).known).toBe(false);
    fs.writeFileSync(mapFile, '{ truncated');
    expect(AllocationMap.load(mapFile, dataFile, 4 * MiB).known).toBe(false);
  });

  it('lets a scan read written extents and skip never-written ones, or read all when unknown', async () => {
    const open = (map: AllocationMap) =>
      new FileBlockDevice(fs.openSync(dataFile, 'r+'), 4 * MiB, false, dataFile, map);
    const known = open(AllocationMap.fresh(4 * MiB));
    await known.write(0, Buffer.alloc(4096, 0xaa), false);
    // Bytes that did not come through the device are invisible to the map...
    const fd = fs.openSync(dataFile, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 0xbb), 0, 4096, 2 * MiB);
    fs.closeSync(fd);
    const buf = Buffer.alloc(3 * MiB);
    await known.readForScan(0, buf);
    expect(buf[0]).toBe(0xaa);
    expect(buf[2 * MiB]).toBe(0);
    known.close();
    // ...which is why a map is trusted only when nothing but the agent wrote the file.
    const unknown = open(AllocationMap.unknown(4 * MiB));
    await unknown.readForScan(0, buf);
    expect(buf[0]).toBe(0xaa);
    expect(buf[2 * MiB]).toBe(0xbb);
    unknown.close();
  });
});
