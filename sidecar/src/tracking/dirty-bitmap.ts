// Which regions of a volume one replication peer may be missing. Resync copies only dirty
// regions, so its cost follows the data changed while the peer was away, not the volume size.
// A bit per region, 32 regions per word; bits past the last region are always zero, so whole
// words can be counted, ORed and scanned without masking.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import { z } from 'zod';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { writeFileAtomic } from '../../../lib/atomic-file';

export const DEFAULT_REGION_SIZE = 64 * 1024;

const MIN_REGION_SIZE = 4096;
// Region indexes stay below 2^32 so `>>> 5` and `& 31` address words and bits directly.
const MAX_REGION_COUNT = 2 ** 32;
const BIG_ENDIAN = os.endianness() === 'BE';

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Bits lo..hi (inclusive, 0..31) of a word. */
function bitMask(lo: number, hi: number): number {
  return ((0xffffffff << lo) & (0xffffffff >>> (31 - hi))) >>> 0;
}

function invalid(message: string): LockstepError {
  return new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', message);
}

function outOfRange(message: string): LockstepError {
  return new LockstepError('LOCKSTEP_ERR_OUT_OF_RANGE', message);
}

function isPowerOfTwo(n: number): boolean {
  // Math.log2 rounds near 2^53, so confirm by raising back.
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

function requireInteger(what: string, n: number): void {
  if (!Number.isSafeInteger(n)) throw invalid(`${what} must be an integer, got ${n}`);
}

/** What readers of a peer's bitmap see; its owner (VolumeTracking) alone changes it. */
export type ReadonlyDirtyBitmap = Pick<
  DirtyBitmap,
  | 'volumeSize'
  | 'regionSize'
  | 'regionCount'
  | 'dirtyRegions'
  | 'isDirty'
  | 'nextDirty'
  | 'nextClean'
  | 'dirtyBytes'
  | 'regionRange'
  | 'regionsOf'
>;

export class DirtyBitmap {
  readonly regionCount: number;
  private readonly words: Uint32Array;
  private dirty = 0;

  constructor(
    readonly volumeSize: number,
    readonly regionSize: number,
  ) {
    this.regionCount = DirtyBitmap.regionCountOf(volumeSize, regionSize);
    this.words = new Uint32Array(Math.ceil(this.regionCount / 32));
  }

  /**
   * The number of regions of a geometry, refused as the constructor refuses it, without
   * allocating a bitmap (16 MiB for 8 TiB in 64 KiB regions).
   */
  static regionCountOf(volumeSize: number, regionSize: number): number {
    if (!Number.isSafeInteger(volumeSize) || volumeSize <= 0) {
      throw invalid(`volume size must be a positive integer, got ${volumeSize}`);
    }
    if (!isPowerOfTwo(regionSize) || regionSize < MIN_REGION_SIZE) {
      throw invalid(`region size must be a power of two >= ${MIN_REGION_SIZE}, got ${regionSize}`);
    }
    const regionCount = Math.ceil(volumeSize / regionSize);
    if (regionCount > MAX_REGION_COUNT) {
      throw invalid(
        `region size ${regionSize} splits a ${volumeSize}-byte volume into more than ` +
          `${MAX_REGION_COUNT} regions; use a larger region size`,
      );
    }
    return regionCount;
  }

  get dirtyRegions(): number {
    return this.dirty;
  }

  /**
   * Regions [first, last] that a byte range touches. A zero-length range touches none and
   * yields last = first - 1, so `for (r = first; r <= last; r++)` runs zero times.
   */
  regionsOf(offset: number, length: number): { first: number; last: number } {
    requireInteger('offset', offset);
    requireInteger('length', length);
    if (offset < 0 || length < 0 || offset + length > this.volumeSize) {
      throw outOfRange(
        `byte range [${offset}, ${offset + length}) is outside the volume (0..${this.volumeSize})`,
      );
    }
    // Exact: the region size is a power of two, so this division never rounds.
    const first = Math.floor(offset / this.regionSize);
    if (length === 0) return { first, last: first - 1 };
    return { first, last: Math.floor((offset + length - 1) / this.regionSize) };
  }

  /** Marks every region that [offset, offset+length) touches. Returns how many regions became newly dirty. */
  markRange(offset: number, length: number): number {
    const { first, last } = this.regionsOf(offset, length);
    if (last < first) return 0;
    // Word at a time: a large write (or a resync restart) must not cost a loop per region.
    let added = 0;
    const firstWord = first >>> 5;
    const lastWord = last >>> 5;
    for (let w = firstWord; w <= lastWord; w++) {
      const mask = bitMask(w === firstWord ? first & 31 : 0, w === lastWord ? last & 31 : 31);
      const old = this.words[w];
      added += popcount(mask & ~old);
      this.words[w] = old | mask;
    }
    this.dirty += added;
    return added;
  }

  /** True if the region was clean. */
  markRegion(region: number): boolean {
    this.checkRegion(region);
    const bit = 1 << (region & 31);
    const w = region >>> 5;
    if (this.words[w] & bit) return false;
    this.words[w] |= bit;
    this.dirty++;
    return true;
  }

  /** True if the region was dirty. */
  clearRegion(region: number): boolean {
    this.checkRegion(region);
    const bit = 1 << (region & 31);
    const w = region >>> 5;
    if (!(this.words[w] & bit)) return false;
    this.words[w] &= ~bit;
    this.dirty--;
    return true;
  }

  /**
   * Clears regions [first, last] a word at a time (a baseline settles terabytes of never-written
   * regions this way). Returns how many were dirty.
   */
  clearRange(first: number, last: number): number {
    this.checkRegion(first);
    this.checkRegion(last);
    let cleared = 0;
    const firstWord = first >>> 5;
    const lastWord = last >>> 5;
    for (let w = firstWord; w <= lastWord; w++) {
      const mask = bitMask(w === firstWord ? first & 31 : 0, w === lastWord ? last & 31 : 31);
      const old = this.words[w];
      cleared += popcount(old & mask);
      this.words[w] = old & ~mask;
    }
    this.dirty -= cleared;
    return cleared;
  }

  isDirty(region: number): boolean {
    this.checkRegion(region);
    return (this.words[region >>> 5] & (1 << (region & 31))) !== 0;
  }

  setAll(): void {
    this.words.fill(0xffffffff);
    const tail = this.regionCount & 31;
    if (tail !== 0) this.words[this.words.length - 1] = bitMask(0, tail - 1);
    this.dirty = this.regionCount;
  }

  clearAll(): void {
    this.words.fill(0);
    this.dirty = 0;
  }

  /** Bytes covered by dirty regions (the last region may be shorter than regionSize). */
  dirtyBytes(): number {
    let bytes = this.dirty * this.regionSize;
    const last = this.regionCount - 1;
    if (this.isDirty(last)) bytes -= this.regionSize - this.regionRange(last).length;
    return bytes;
  }

  /**
   * First dirty region in [from, end), or -1. `from` may be regionCount, so scans can resume at
   * r + 1. Skips 32 clean regions per step.
   */
  nextDirty(from: number, end = this.regionCount): number {
    return this.search(from, end, 0);
  }

  /** First clean region in [from, end), or -1: where a run of dirty regions stops. */
  nextClean(from: number, end = this.regionCount): number {
    return this.search(from, end, 0xffffffff);
  }

  /** First region in [from, end) whose bit differs from `skip` (a word of 0s or 1s), or -1. */
  private search(from: number, end: number, skip: number): number {
    requireInteger('region', from);
    requireInteger('region', end);
    if (from < 0 || from > this.regionCount || end > this.regionCount) {
      throw outOfRange(`regions ${from}..${end} are outside 0..${this.regionCount}`);
    }
    if (from >= end) return -1;
    const lastWord = (end - 1) >>> 5;
    let w = from >>> 5;
    let word = ((this.words[w] ^ skip) & (0xffffffff << (from & 31))) >>> 0;
    while (word === 0) {
      if (++w > lastWord) return -1;
      word = (this.words[w] ^ skip) >>> 0;
    }
    // word & -word isolates the lowest set bit; clz32 turns it into an index in one step.
    const region = w * 32 + (31 - Math.clz32(word & -word));
    return region < end ? region : -1;
  }

  /** Byte range of a region, clipped to the volume size. */
  regionRange(region: number): { offset: number; length: number } {
    this.checkRegion(region);
    const offset = region * this.regionSize;
    return { offset, length: Math.min(this.regionSize, this.volumeSize - offset) };
  }

  /** ORs another bitmap of the same geometry into this one. */
  merge(other: DirtyBitmap): void {
    if (other.volumeSize !== this.volumeSize || other.regionSize !== this.regionSize) {
      throw invalid(
        `cannot merge a bitmap of ${other.volumeSize} bytes / ${other.regionSize}-byte regions ` +
          `into one of ${this.volumeSize} bytes / ${this.regionSize}-byte regions`,
      );
    }
    for (let w = 0; w < this.words.length; w++) {
      const old = this.words[w];
      const theirs = other.words[w];
      this.dirty += popcount(theirs & ~old);
      this.words[w] = old | theirs;
    }
  }

  /** Raw words for persistence, little-endian whatever the host. */
  toBuffer(): Buffer {
    const buf = Buffer.allocUnsafe(this.words.byteLength);
    this.copyWordsTo(buf);
    return buf;
  }

  /** Writes the raw words (little-endian) into `target`, a memory copy rather than a word loop. */
  copyWordsTo(target: Buffer): void {
    Buffer.from(this.words.buffer, this.words.byteOffset, this.words.byteLength).copy(target);
    if (BIG_ENDIAN) target.subarray(0, this.words.byteLength).swap32();
  }

  static fromBuffer(volumeSize: number, regionSize: number, buf: Buffer): DirtyBitmap {
    const bitmap = new DirtyBitmap(volumeSize, regionSize);
    const { words } = bitmap;
    if (buf.length !== words.length * 4) {
      throw invalid(
        `a bitmap of ${bitmap.regionCount} regions takes ${words.length * 4} bytes, got ${buf.length}`,
      );
    }
    const bytes = Buffer.from(words.buffer, words.byteOffset, words.byteLength);
    buf.copy(bytes);
    if (BIG_ENDIAN) bytes.swap32();
    let dirty = 0;
    for (let w = 0; w < words.length; w++) dirty += popcount(words[w]);
    const tail = bitmap.regionCount & 31;
    // Stray bits past the end would inflate the count and break the whole-word invariant.
    if (tail !== 0 && words[words.length - 1] & ~bitMask(0, tail - 1)) {
      throw invalid(`bitmap has bits set past its last region (${bitmap.regionCount - 1})`);
    }
    bitmap.dirty = dirty;
    return bitmap;
  }

  private checkRegion(region: number): void {
    requireInteger('region', region);
    if (region < 0 || region >= this.regionCount) {
      throw outOfRange(`region ${region} is outside 0..${this.regionCount - 1}`);
    }
  }
}

// On-disk format (all integers little-endian):
//
//   offset      size  field
//   0           8     magic "LSBITMAP"
//   8           4     u32 format version (1)
//   12          4     u32 header JSON length N
//   16          N     header JSON, utf8: { volumeUuid, peer, volumeSize, regionSize }
//   16+N        4*W   bitmap words, u32 each, W = ceil(regionCount / 32)
//   16+N+4*W    32    SHA-256 over every byte before it
//
// The header repeats the geometry so a file left over from a resized or recreated volume is
// refused instead of silently applied to the wrong regions.

export const BITMAP_FORMAT = 1;
const MAGIC = Buffer.from('LSBITMAP', 'latin1');
const PREAMBLE = MAGIC.length + 8;
const DIGEST = 32;

const headerSchema = z.object({
  volumeUuid: z.string().uuid(),
  peer: z.string().min(1),
  volumeSize: z.number().int().positive(),
  regionSize: z.number().int().positive(),
  /** A round of establishment's plan (replication/establishment.ts): which round it is. */
  round: z
    .object({ snapshotUid: z.string().min(1), baseUid: z.string(), peerIsZero: z.boolean() })
    .optional(),
});

export type BitmapFileHeader = z.infer<typeof headerSchema>;

/** Bytes hashed between two turns of the event loop (about a millisecond's work). */
const HASH_SLICE = 1024 * 1024;

/**
 * SHA-256 a slice at a time: a bitmap of a large volume is megabytes (16 MiB for 8 TiB in
 * 64 KiB regions, ~15 ms to hash), saved every second while a resync runs, and the event loop
 * serves every volume of the agent meanwhile. (WebCrypto's digest is no way out: it copies its
 * input on the event loop, which costs more than hashing it here.)
 */
async function sha256(data: Buffer): Promise<Buffer> {
  const hash = createHash('sha256');
  for (let at = 0; at < data.length; at += HASH_SLICE) {
    if (at > 0) await new Promise((resolve) => setImmediate(resolve));
    hash.update(data.subarray(at, at + HASH_SLICE));
  }
  return hash.digest();
}

export async function saveDirtyBitmap(
  file: string,
  header: BitmapFileHeader,
  bitmap: DirtyBitmap,
): Promise<void> {
  const parsed = headerSchema.safeParse(header);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw invalid(
      `dirty bitmap header field ${issue?.path.join('.') || '(root)'}: ${issue?.message ?? 'invalid'}`,
    );
  }
  if (header.volumeSize !== bitmap.volumeSize || header.regionSize !== bitmap.regionSize) {
    throw invalid(
      `dirty bitmap header (${header.volumeSize} bytes, ${header.regionSize}-byte regions) does ` +
        `not match the bitmap (${bitmap.volumeSize} bytes, ${bitmap.regionSize}-byte regions)`,
    );
  }
  // Schema order, unknown keys dropped: the file holds exactly the documented header.
  const json = Buffer.from(JSON.stringify(parsed.data), 'utf8');
  // One buffer for the whole file: the words are copied once, as they are now, and the live
  // bitmap may change while the digest is computed and the file written.
  const wordBytes = Math.ceil(bitmap.regionCount / 32) * 4;
  const out = Buffer.allocUnsafe(PREAMBLE + json.length + wordBytes + DIGEST);
  MAGIC.copy(out, 0);
  out.writeUInt32LE(BITMAP_FORMAT, MAGIC.length);
  out.writeUInt32LE(json.length, MAGIC.length + 4);
  json.copy(out, PREAMBLE);
  bitmap.copyWordsTo(out.subarray(PREAMBLE + json.length));
  const bodyEnd = out.length - DIGEST;
  (await sha256(out.subarray(0, bodyEnd))).copy(out, bodyEnd);
  await writeFileAtomic(file, out);
}

export async function loadDirtyBitmap(
  file: string,
  expect: { volumeUuid: string; volumeSize: number; regionSize: number },
): Promise<{ header: BitmapFileHeader; bitmap: DirtyBitmap }> {
  const corrupt = (why: string, cause?: unknown) =>
    new LockstepError(
      'LOCKSTEP_ERR_METADATA_CORRUPT',
      `dirty bitmap ${file} is unusable (${why}); ` +
        'the caller falls back to a full checksum resync of this peer.',
      { cause },
    );
  let buf: Buffer;
  try {
    buf = await fs.readFile(file);
  } catch (err) {
    throw corrupt(`cannot read it: ${errorMessage(err)}`, err);
  }

  // Structure first, checksum second: a short file should say "truncated", not just "mismatch".
  if (buf.length < PREAMBLE + DIGEST) throw corrupt(`truncated: only ${buf.length} bytes`);
  if (!buf.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw corrupt('bad magic, not a Lockstep dirty bitmap');
  }
  const version = buf.readUInt32LE(MAGIC.length);
  if (version !== BITMAP_FORMAT) throw corrupt(`unsupported format version ${version}`);
  const jsonLength = buf.readUInt32LE(MAGIC.length + 4);
  if (PREAMBLE + jsonLength + DIGEST > buf.length) {
    throw corrupt(`truncated: header length ${jsonLength} runs past the end of the file`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(buf.toString('utf8', PREAMBLE, PREAMBLE + jsonLength));
  } catch (err) {
    throw corrupt('header is not valid JSON', err);
  }
  const parsed = headerSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw corrupt(
      `header field ${issue?.path.join('.') || '(root)'}: ${issue?.message ?? 'invalid'}`,
    );
  }
  const header = parsed.data;
  let regionCount: number;
  try {
    regionCount = DirtyBitmap.regionCountOf(header.volumeSize, header.regionSize);
  } catch (err) {
    throw corrupt(`header geometry: ${errorMessage(err)}`, err);
  }
  const wordBytes = Math.ceil(regionCount / 32) * 4;
  const expectedLength = PREAMBLE + jsonLength + wordBytes + DIGEST;
  if (buf.length !== expectedLength) {
    throw corrupt(
      `${buf.length < expectedLength ? 'truncated' : 'trailing bytes'}: file is ${buf.length} ` +
        `bytes but its header describes ${expectedLength}`,
    );
  }
  const bodyEnd = buf.length - DIGEST;
  if (!(await sha256(buf.subarray(0, bodyEnd))).equals(buf.subarray(bodyEnd))) {
    throw corrupt('checksum mismatch');
  }

  // Intact, but possibly for another volume or an older geometry: applying it would mark the
  // wrong regions, so it is as useless as a corrupt one.
  if (header.volumeUuid !== expect.volumeUuid) {
    throw corrupt(`it belongs to volume ${header.volumeUuid}, expected ${expect.volumeUuid}`);
  }
  if (header.volumeSize !== expect.volumeSize) {
    throw corrupt(`it covers ${header.volumeSize} bytes, the volume has ${expect.volumeSize}`);
  }
  if (header.regionSize !== expect.regionSize) {
    throw corrupt(`its region size is ${header.regionSize}, expected ${expect.regionSize}`);
  }
  let bitmap: DirtyBitmap;
  try {
    bitmap = DirtyBitmap.fromBuffer(
      header.volumeSize,
      header.regionSize,
      buf.subarray(PREAMBLE + jsonLength, bodyEnd),
    );
  } catch (err) {
    throw corrupt(errorMessage(err), err);
  }
  return { header, bitmap };
}
