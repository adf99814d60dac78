import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  DirtyBitmap,
  loadDirtyBitmap,
  saveDirtyBitmap,
  type BitmapFileHeader,
} from '../../sidecar/src/tracking/dirty-bitmap';

const KiB = 1024;
const R = 4096;

/** The code of the error fn throws, or 'no error'. */
function codeOf(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return (err as { code?: unknown }).code;
  }
  return 'no error';
}

function dirtyList(b: DirtyBitmap): number[] {
  const out: number[] = [];
  for (let r = b.nextDirty(0); r !== -1; r = b.nextDirty(r + 1)) out.push(r);
  return out;
}

function bruteCount(b: DirtyBitmap): number {
  let n = 0;
  for (let r = 0; r < b.regionCount; r++) if (b.isDirty(r)) n++;
  return n;
}

describe('DirtyBitmap', () => {
  it('derives the region count, rounding a partial last region up', () => {
    expect(new DirtyBitmap(10 * R, R).regionCount).toBe(10);
    expect(new DirtyBitmap(10 * R + 1, R).regionCount).toBe(11);
    expect(new DirtyBitmap(1, 64 * KiB).regionCount).toBe(1);
  });

  it.each([0, 1000, 2048, 3 * R, 4097, 1.5 * R])('rejects region size %p', (size) => {
    expect(codeOf(() => new DirtyBitmap(1 << 20, size))).toBe('LOCKSTEP_ERR_INVALID_ARGUMENT');
  });

  it('rejects a volume size that is not a positive integer', () => {
    for (const size of [0, -1, 1.5, NaN]) {
      expect(codeOf(() => new DirtyBitmap(size, R))).toBe('LOCKSTEP_ERR_INVALID_ARGUMENT');
    }
  });

  it('marks every region a range straddling boundaries touches, and only those', () => {
    const b = new DirtyBitmap(16 * R, R);
    expect(b.regionsOf(R - 1, 2)).toEqual({ first: 0, last: 1 });
    expect(b.markRange(R - 1, 2)).toBe(2);
    expect(dirtyList(b)).toEqual([0, 1]);
    // Exactly one region, ending on a boundary: the next region is not touched.
    expect(b.markRange(3 * R, R)).toBe(1);
    expect(b.isDirty(4)).toBe(false);
    // Overlapping an already-dirty region counts only the new ones.
    expect(b.markRange(R, 3 * R + 1)).toBe(2);
    expect(dirtyList(b)).toEqual([0, 1, 2, 3, 4]);
    expect(b.dirtyRegions).toBe(5);
  });

  it('treats a zero-length range as touching nothing', () => {
    const b = new DirtyBitmap(4 * R, R);
    expect(b.regionsOf(R, 0)).toEqual({ first: 1, last: 0 });
    expect(b.markRange(R, 0)).toBe(0);
    expect(b.markRange(4 * R, 0)).toBe(0);
    expect(b.dirtyRegions).toBe(0);
  });

  it('marks long ranges spanning many words with the right count', () => {
    const b = new DirtyBitmap(200 * R, R);
    b.markRegion(40);
    expect(b.markRange(5 * R + 7, 150 * R)).toBe(150); // regions 5..155, 40 already dirty
    expect(b.dirtyRegions).toBe(151);
    expect(bruteCount(b)).toBe(151);
    expect(b.isDirty(4)).toBe(false);
    expect(b.isDirty(156)).toBe(false);
    expect(b.nextDirty(0)).toBe(5);
  });

  it('rejects ranges and regions outside the volume', () => {
    const b = new DirtyBitmap(4 * R + 100, R);
    const outOfRange = 'LOCKSTEP_ERR_OUT_OF_RANGE';
    expect(codeOf(() => b.markRange(4 * R + 99, 2))).toBe(outOfRange);
    expect(codeOf(() => b.markRange(-1, 2))).toBe(outOfRange);
    expect(codeOf(() => b.regionsOf(0, 4 * R + 101))).toBe(outOfRange);
    expect(codeOf(() => b.markRegion(5))).toBe(outOfRange);
    expect(codeOf(() => b.clearRegion(-1))).toBe(outOfRange);
    expect(codeOf(() => b.isDirty(5))).toBe(outOfRange);
    expect(codeOf(() => b.regionRange(5))).toBe(outOfRange);
    expect(codeOf(() => b.nextDirty(6))).toBe(outOfRange);
    expect(codeOf(() => b.markRange(0.5, 1))).toBe('LOCKSTEP_ERR_INVALID_ARGUMENT');
    // The last byte is inside.
    expect(b.markRange(4 * R + 99, 1)).toBe(1);
    expect(b.isDirty(4)).toBe(true);
  });

  it('clips the last partial region in regionRange and dirtyBytes', () => {
    const b = new DirtyBitmap(10 * R + 100, R);
    expect(b.regionRange(0)).toEqual({ offset: 0, length: R });
    expect(b.regionRange(10)).toEqual({ offset: 10 * R, length: 100 });
    b.markRegion(10);
    expect(b.dirtyBytes()).toBe(100);
    b.markRegion(3);
    expect(b.dirtyBytes()).toBe(R + 100);
    b.clearRegion(10);
    expect(b.dirtyBytes()).toBe(R);
    b.setAll();
    expect(b.dirtyBytes()).toBe(b.volumeSize);
  });

  it('finds the next dirty region across word boundaries and at the end', () => {
    const b = new DirtyBitmap(100 * R, R);
    expect(b.nextDirty(0)).toBe(-1);
    for (const r of [31, 32, 63, 64, 99]) b.markRegion(r);
    expect(dirtyList(b)).toEqual([31, 32, 63, 64, 99]);
    expect(b.nextDirty(31)).toBe(31); // bit 31 is the sign bit of its word
    expect(b.nextDirty(33)).toBe(63);
    expect(b.nextDirty(65)).toBe(99);
    expect(b.nextDirty(99)).toBe(99);
    expect(b.nextDirty(100)).toBe(-1);
    b.clearRegion(99);
    expect(b.nextDirty(65)).toBe(-1);
  });

  it('finds the only dirty region at the end of a 1 TiB volume', () => {
    const regions = 16 * 1024 * 1024; // 1 TiB of 64 KiB regions
    const b = new DirtyBitmap(regions * 64 * KiB, 64 * KiB);
    expect(b.regionCount).toBe(regions);
    b.markRegion(regions - 1);
    expect(b.nextDirty(0)).toBe(regions - 1);
    expect(b.nextDirty(regions)).toBe(-1);
  });

  it('keeps the dirty count in step with the bits', () => {
    const b = new DirtyBitmap(300 * R + 5, R);
    expect(b.markRegion(7)).toBe(true);
    expect(b.markRegion(7)).toBe(false);
    expect(b.clearRegion(7)).toBe(true);
    expect(b.clearRegion(7)).toBe(false);
    expect(b.dirtyRegions).toBe(0);

    // Deterministic mix of operations, checked against a full count after each one.
    let seed = 12345;
    const rand = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    for (let i = 0; i < 500; i++) {
      const op = rand(10);
      if (op < 4) b.markRegion(rand(b.regionCount));
      else if (op < 8) b.clearRegion(rand(b.regionCount));
      else if (op === 8) {
        const offset = rand(b.volumeSize);
        b.markRange(offset, Math.min(1 + rand(40 * R), b.volumeSize - offset));
      } else if (rand(5) === 0) b.setAll();
      else b.clearAll();
      if (b.dirtyRegions !== bruteCount(b)) throw new Error(`count drifted at step ${i}`);
    }
    expect(b.dirtyRegions).toBe(bruteCount(b));
    b.setAll();
    expect(b.dirtyRegions).toBe(b.regionCount);
    expect(bruteCount(b)).toBe(b.regionCount);
    b.clearAll();
    expect(b.dirtyRegions).toBe(0);
    expect(b.nextDirty(0)).toBe(-1);
  });

  it('merges by OR and counts only newly dirty regions', () => {
    const a = new DirtyBitmap(70 * R, R);
    const b = new DirtyBitmap(70 * R, R);
    a.markRange(0, 10 * R); // 0..9
    b.markRange(5 * R, 10 * R); // 5..14
    b.markRegion(69);
    a.merge(b);
    expect(a.dirtyRegions).toBe(16);
    expect(dirtyList(a)).toEqual([...Array.from({ length: 15 }, (_, i) => i), 69]);
    expect(b.dirtyRegions).toBe(11); // the source is untouched
    expect(codeOf(() => a.merge(new DirtyBitmap(70 * R, 2 * R)))).toBe(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
    );
    expect(codeOf(() => a.merge(new DirtyBitmap(71 * R, R)))).toBe('LOCKSTEP_ERR_INVALID_ARGUMENT');
  });

  it('round-trips through raw little-endian words', () => {
    const b = new DirtyBitmap(40 * R, R);
    b.markRegion(0);
    b.markRegion(31);
    b.markRegion(39);
    const buf = b.toBuffer();
    expect(buf.length).toBe(8);
    expect(buf.readUInt32LE(0)).toBe(0x80000001);
    expect(buf.readUInt32LE(4)).toBe(1 << 7);
    const copy = DirtyBitmap.fromBuffer(40 * R, R, buf);
    expect(dirtyList(copy)).toEqual([0, 31, 39]);
    expect(copy.dirtyRegions).toBe(3);
  });

  it('refuses raw words of the wrong length or with bits past the last region', () => {
    const invalid = 'LOCKSTEP_ERR_INVALID_ARGUMENT';
    expect(codeOf(() => DirtyBitmap.fromBuffer(40 * R, R, Buffer.alloc(4)))).toBe(invalid);
    const stray = Buffer.alloc(8);
    stray.writeUInt32LE(1 << 8, 4); // region 40 of a 40-region bitmap
    expect(codeOf(() => DirtyBitmap.fromBuffer(40 * R, R, stray))).toBe(invalid);
  });
});

describe('DirtyBitmap range operations', () => {
  /** Deterministic pseudo-random integers below n. */
  const random = (seed: number) => (n: number) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed % n;
  };

  it('clears a range a word at a time, across word boundaries, counting what was dirty', () => {
    const b = new DirtyBitmap(200 * R + 100, R); // 201 regions: the last word is partly used
    b.setAll();
    expect(b.clearRange(30, 97)).toBe(68);
    expect(b.dirtyRegions).toBe(201 - 68);
    expect(b.isDirty(29)).toBe(true);
    expect(b.isDirty(30)).toBe(false);
    expect(b.isDirty(97)).toBe(false);
    expect(b.isDirty(98)).toBe(true);
    expect(b.clearRange(0, 200)).toBe(201 - 68);
    expect(b.dirtyRegions).toBe(0);
    expect(b.clearRange(5, 5)).toBe(0);
    b.markRegion(5);
    expect(b.clearRange(5, 5)).toBe(1);
    const outOfRange = 'LOCKSTEP_ERR_OUT_OF_RANGE';
    expect(codeOf(() => b.clearRange(0, 201))).toBe(outOfRange);
    expect(codeOf(() => b.clearRange(-1, 3))).toBe(outOfRange);
  });

  it('finds the next dirty and the next clean region within a window', () => {
    const b = new DirtyBitmap(100 * R, R);
    b.markRange(31 * R, 34 * R); // 31..64
    expect(b.nextDirty(0, 31)).toBe(-1);
    expect(b.nextDirty(0, 32)).toBe(31);
    expect(b.nextClean(31)).toBe(65);
    expect(b.nextClean(31, 65)).toBe(-1);
    expect(b.nextClean(40, 66)).toBe(65);
    expect(b.nextClean(0)).toBe(0);
    expect(b.nextDirty(65)).toBe(-1);
    expect(b.nextDirty(100)).toBe(-1);
    expect(b.nextClean(100)).toBe(-1);
    b.setAll();
    // Bits past the last region are zero, yet no region past the end is ever "clean".
    expect(b.nextClean(0)).toBe(-1);
    expect(codeOf(() => b.nextClean(0, 101))).toBe('LOCKSTEP_ERR_OUT_OF_RANGE');
  });

  it('agrees with a region-by-region model under random marks and clears', () => {
    const b = new DirtyBitmap(700 * R + 1, R);
    const model = new Array<boolean>(b.regionCount).fill(false);
    const rand = random(777);
    for (let i = 0; i < 400; i++) {
      const first = rand(b.regionCount);
      const last = Math.min(b.regionCount - 1, first + rand(100));
      if (rand(2) === 0) {
        b.markRange(first * R, Math.min(b.volumeSize, (last + 1) * R) - first * R);
        for (let r = first; r <= last; r++) model[r] = true;
      } else {
        const wasDirty = model.slice(first, last + 1).filter(Boolean).length;
        expect(b.clearRange(first, last)).toBe(wasDirty);
        for (let r = first; r <= last; r++) model[r] = false;
      }
      const from = rand(b.regionCount + 1);
      const end = from + rand(b.regionCount + 1 - from);
      const dirty = model.findIndex((d, r) => d && r >= from && r < end);
      const clean = model.findIndex((d, r) => !d && r >= from && r < end);
      expect([b.nextDirty(from, end), b.nextClean(from, end)]).toEqual([dirty, clean]);
    }
    expect(b.dirtyRegions).toBe(model.filter(Boolean).length);
  });

  it('sets and clears all of an 8 TiB volume at 64 KiB regions a word at a time', () => {
    const regions = 128 * 1024 * 1024;
    const b = new DirtyBitmap(regions * 64 * KiB, 64 * KiB);
    b.setAll();
    expect(b.nextClean(0)).toBe(-1);
    expect(b.clearRange(1, regions - 2)).toBe(regions - 2);
    expect(b.dirtyRegions).toBe(2);
    expect(b.nextDirty(1)).toBe(regions - 1);
    expect(b.nextClean(0)).toBe(1);
    expect(b.dirtyBytes()).toBe(2 * 64 * KiB);
  });

  it('tells the region count of a geometry without allocating the bitmap', () => {
    expect(DirtyBitmap.regionCountOf(8 * 2 ** 40, 64 * KiB)).toBe(2 ** 27);
    expect(DirtyBitmap.regionCountOf(10 * R + 1, R)).toBe(11);
    expect(codeOf(() => DirtyBitmap.regionCountOf(2 ** 50, R))).toBe(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
    );
    expect(codeOf(() => DirtyBitmap.regionCountOf(R, 1000))).toBe('LOCKSTEP_ERR_INVALID_ARGUMENT');
  });
});

describe('dirty bitmap file', () => {
  let dir: string;
  let file: string;
  let header: BitmapFileHeader;
  let bitmap: DirtyBitmap;
  const expectOf = (h: BitmapFileHeader) => ({
    volumeUuid: h.volumeUuid,
    volumeSize: h.volumeSize,
    regionSize: h.regionSize,
  });

  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bitmap-'));
    file = path.join(dir, 'peer-b.bitmap');
    // 1000 regions plus a partial one: the last word is only partly used.
    header = {
      volumeUuid: randomUUID(),
      peer: 'node-b',
      volumeSize: 1000 * R + 512,
      regionSize: R,
    };
    bitmap = new DirtyBitmap(header.volumeSize, header.regionSize);
    bitmap.markRange(10 * R, 5 * R);
    bitmap.markRegion(999);
    bitmap.markRegion(1000);
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('round-trips and leaves no temp file behind', async () => {
    await saveDirtyBitmap(file, header, bitmap);
    const loaded = await loadDirtyBitmap(file, expectOf(header));
    expect(loaded.header).toEqual(header);
    expect(loaded.bitmap.dirtyRegions).toBe(7);
    expect(dirtyList(loaded.bitmap)).toEqual(dirtyList(bitmap));
    expect(loaded.bitmap.toBuffer().equals(bitmap.toBuffer())).toBe(true);
    expect(readdirSync(dir)).toEqual(['peer-b.bitmap']);
    expect(readFileSync(file).subarray(0, 8).toString('latin1')).toBe('LSBITMAP');
  });

  it('replaces an older save', async () => {
    await saveDirtyBitmap(file, header, bitmap);
    bitmap.clearAll();
    bitmap.markRegion(3);
    await saveDirtyBitmap(file, header, bitmap);
    const loaded = await loadDirtyBitmap(file, expectOf(header));
    expect(dirtyList(loaded.bitmap)).toEqual([3]);
  });

  it('refuses to save a header that disagrees with the bitmap', async () => {
    await expect(
      saveDirtyBitmap(file, { ...header, regionSize: 2 * R }, bitmap),
    ).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_INVALID_ARGUMENT' });
    expect(readdirSync(dir)).toEqual([]);
  });

  const flip = (offset: (buf: Buffer) => number) => (buf: Buffer) => {
    const out = Buffer.from(buf);
    out[offset(buf)] ^= 0x01;
    return out;
  };

  it.each<[string, (buf: Buffer) => Buffer, RegExp]>([
    ['truncated in the words', (buf) => buf.subarray(0, buf.length - 40), /truncated/],
    ['truncated to a few bytes', (buf) => buf.subarray(0, 10), /truncated/],
    ['empty', () => Buffer.alloc(0), /truncated/],
    ['longer than described', (buf) => Buffer.concat([buf, Buffer.alloc(4)]), /trailing bytes/],
    ['corrupted in the words', flip((buf) => buf.length - 40), /checksum mismatch/],
    ['corrupted in the checksum', flip((buf) => buf.length - 1), /checksum mismatch/],
    ['corrupted in the header', flip((buf) => buf.indexOf('node-b')), /checksum mismatch/],
    ['corrupted in the magic', flip(() => 0), /bad magic/],
    ['of another format version', flip(() => 9), /unsupported format version/],
  ])('rejects a file that is %s, naming it', async (_what, mangle, why) => {
    await saveDirtyBitmap(file, header, bitmap);
    writeFileSync(file, mangle(readFileSync(file)));
    const err = await loadDirtyBitmap(file, expectOf(header)).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'LOCKSTEP_ERR_METADATA_CORRUPT' });
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(why);
    expect((err as Error).message).toContain('full checksum resync');
  });

  it.each<[string, (h: BitmapFileHeader) => Partial<BitmapFileHeader>, RegExp]>([
    ['volume uuid', () => ({ volumeUuid: randomUUID() }), /belongs to volume/],
    ['region size', (h) => ({ regionSize: h.regionSize * 2 }), /region size/],
    ['volume size', (h) => ({ volumeSize: h.volumeSize + R }), /covers \d+ bytes/],
  ])('rejects an intact file for the wrong %s, naming it', async (_what, change, why) => {
    await saveDirtyBitmap(file, header, bitmap);
    const err = await loadDirtyBitmap(file, { ...expectOf(header), ...change(header) }).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'LOCKSTEP_ERR_METADATA_CORRUPT' });
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(why);
    expect((err as Error).message).toContain('full checksum resync');
  });

  it('reports a missing file the same way', async () => {
    const err = await loadDirtyBitmap(file, expectOf(header)).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'LOCKSTEP_ERR_METADATA_CORRUPT' });
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(/cannot read it/);
  });
});
