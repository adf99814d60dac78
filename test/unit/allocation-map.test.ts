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

  it('finds the next written and never-written byte a word at a time, within the bounds given', () => {
    const E = EXTENT_BYTES;
    const map = AllocationMap.fresh(4 * MiB); // 64 extents: two words
    map.markWritten(30 * E + 5, 5 * E); // extents 30..35, across the word boundary
    expect(map.nextWritten(0, 4 * MiB)).toBe(30 * E);
    expect(map.nextWritten(31 * E + 7, 4 * MiB)).toBe(31 * E + 7); // never before `from`
    expect(map.nextWritten(0, 30 * E)).toBe(30 * E); // none before `end`: `end`
    expect(map.nextWritten(36 * E, 4 * MiB)).toBe(4 * MiB);
    expect(map.nextUnwritten(30 * E, 4 * MiB)).toBe(36 * E);
    expect(map.nextUnwritten(30 * E, 33 * E)).toBe(33 * E);
    expect(map.nextUnwritten(0, 4 * MiB)).toBe(0);
    expect(map.nextWritten(5, 5)).toBe(5);
    // Unknown: everything may hold data.
    const unknown = AllocationMap.unknown(4 * MiB);
    expect(unknown.nextWritten(123, 4 * MiB)).toBe(123);
    expect(unknown.nextUnwritten(123, 4 * MiB)).toBe(4 * MiB);
  });

  it('agrees with an extent-by-extent model, a partial last extent included', () => {
    const E = EXTENT_BYTES;
    const size = 200 * E + 4096;
    const map = AllocationMap.fresh(size);
    const model = new Array<boolean>(201).fill(false);
    let seed = 99;
    const rand = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    for (let i = 0; i < 300; i++) {
      if (rand(4) === 0) {
        const offset = rand(size);
        const length = 1 + rand(Math.min(size - offset, 40 * E));
        map.markWritten(offset, length);
        for (let e = Math.floor(offset / E); e <= Math.floor((offset + length - 1) / E); e++)
          model[e] = true;
      }
      const from = rand(size);
      const end = from + rand(size + 1 - from);
      const firstExtent = (want: boolean) => {
        for (let e = Math.floor(from / E); e * E < end; e++)
          if (model[e] === want) return Math.max(from, e * E);
        return end;
      };
      expect([map.nextWritten(from, end), map.nextUnwritten(from, end)]).toEqual([
        firstExtent(true),
        firstExtent(false),
      ]);
      expect(map.mayHoldData(from, end - from)).toBe(firstExtent(true) < end);
    }
  });

  it('finds the one written extent at the end of an 8 TiB volume, and saves in the byte layout', async () => {
    const size = 8 * 2 ** 40;
    const map = AllocationMap.fresh(size);
    map.markWritten(size - 1, 1);
    expect(map.nextWritten(0, size)).toBe(size - EXTENT_BYTES);
    expect(map.nextUnwritten(size - EXTENT_BYTES, size)).toBe(size);

    // On disk, extent e is bit e % 8 of byte e / 8, as it always was.
    const small = AllocationMap.fresh(4 * MiB);
    small.markWritten(9 * EXTENT_BYTES, 1);
    small.markWritten(63 * EXTENT_BYTES, 1);
    await small.save(mapFile, dataFile);
    const saved = JSON.parse(fs.readFileSync(mapFile, 'utf8')) as { bits: string };
    expect([...Buffer.from(saved.bits, 'base64')]).toEqual([0, 2, 0, 0, 0, 0, 0, 0x80]);
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

  it('zeroes without reading or writing where nothing was ever written, unless asked for no hole', async () => {
    const open = (map: AllocationMap) =>
      new FileBlockDevice(fs.openSync(dataFile, 'r+'), 4 * MiB, false, dataFile, map);
    // Bytes the map does not know of: a zeroing the map skips leaves them alone.
    const fd = fs.openSync(dataFile, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 0xbb), 0, 4096, 2 * MiB);
    fs.closeSync(fd);
    const dev = open(AllocationMap.fresh(4 * MiB));
    await dev.write(MiB, Buffer.alloc(4096, 0xaa), false);
    await dev.writeZeroes(0, 4 * MiB, { fua: false, noHole: false });
    const buf = Buffer.alloc(4 * MiB);
    await dev.read(0, buf);
    expect(buf[MiB]).toBe(0); // written through the device: zeroed
    expect(buf[2 * MiB]).toBe(0xbb); // never written as far as the map knows: not touched
    await dev.writeZeroes(2 * MiB, 4096, { fua: false, noHole: true });
    await dev.read(0, buf);
    expect(buf[2 * MiB]).toBe(0);
    dev.close();
  });
});
