// Which extents of a volume have ever been written, so a baseline reads data and skips holes
// without reading them (Node has no SEEK_DATA or FIEMAP, and reading a sparse file's holes
// through the page cache slows later writes to them on ext4).
//
// Every write goes through the agent, so the map in memory is exact while the volume is
// served. On disk it exists only between a clean stop and the next start: saved after the last
// write and flush, with the data file's identity (inode, size, modification time), and removed
// when read. It is trusted only if the file is still exactly what it was: after a crash there
// is no map, and a change behind the agent's back shows as another identity; either way the
// map is "unknown", every extent counts as written and scans read everything. So no write ever
// waits for the map.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { writeFileAtomic } from '../../../lib/atomic-file';

export const EXTENT_BYTES = 64 * 1024;
const MAGIC = 'lockstep-allocation-map-v1';
// Bits live in 32-bit words so a search skips 32 extents (2 MiB) per step; the file keeps
// the byte layout (extent e is bit e & 7 of byte e >> 3), which is the words' layout on a
// little-endian host and a byte swap away on a big-endian one.
const BIG_ENDIAN = os.endianness() === 'BE';

interface FileIdentity {
  ino: number;
  size: number;
  mtimeNs: string;
}

function identityOf(dataFile: string): FileIdentity {
  const st = fs.statSync(dataFile, { bigint: true });
  return { ino: Number(st.ino), size: Number(st.size), mtimeNs: String(st.mtimeNs) };
}

/** Bits lo..hi (inclusive, 0..31) of a word. */
function bitMask(lo: number, hi: number): number {
  return ((0xffffffff << lo) & (0xffffffff >>> (31 - hi))) >>> 0;
}

function byteLength(sizeBytes: number): number {
  return Math.ceil(Math.ceil(sizeBytes / EXTENT_BYTES) / 8);
}

export class AllocationMap {
  private readonly extents: number;

  private constructor(
    private readonly words: Uint32Array,
    private readonly sizeBytes: number,
    /** False: what was written is unknown, and every extent counts as written. */
    readonly known: boolean,
  ) {
    this.extents = Math.ceil(sizeBytes / EXTENT_BYTES);
  }

  private static empty(sizeBytes: number): Uint32Array {
    return new Uint32Array(Math.ceil(byteLength(sizeBytes) / 4));
  }

  /** A volume whose data file was just created sparse: nothing written yet. */
  static fresh(sizeBytes: number): AllocationMap {
    return new AllocationMap(AllocationMap.empty(sizeBytes), sizeBytes, true);
  }

  /** What was written is unknown (an adopted file, a crash, no saved map). */
  static unknown(sizeBytes: number): AllocationMap {
    return new AllocationMap(AllocationMap.empty(sizeBytes), sizeBytes, false);
  }

  /**
   * The map saved at the last clean stop, if the data file is untouched since; else unknown.
   * The saved map is consumed: from now on only a clean stop writes one again, so a crash
   * always leaves none behind, whatever the file's timestamps say.
   */
  static load(mapFile: string, dataFile: string, sizeBytes: number): AllocationMap {
    try {
      const text = fs.readFileSync(mapFile, 'utf8');
      fs.rmSync(mapFile, { force: true });
      const saved = JSON.parse(text) as {
        magic: string;
        sizeBytes: number;
        extentBytes: number;
        data: FileIdentity;
        bits: string;
        checksum: string;
      };
      const bits = Buffer.from(saved.bits, 'base64');
      const current = identityOf(dataFile);
      const intact =
        saved.magic === MAGIC &&
        saved.sizeBytes === sizeBytes &&
        saved.extentBytes === EXTENT_BYTES &&
        saved.checksum === digest(bits) &&
        bits.length === byteLength(sizeBytes) &&
        saved.data.ino === current.ino &&
        saved.data.size === current.size &&
        saved.data.mtimeNs === current.mtimeNs;
      if (intact) {
        const words = AllocationMap.empty(sizeBytes);
        const bytes = Buffer.from(words.buffer, words.byteOffset, words.byteLength);
        bits.copy(bytes);
        if (BIG_ENDIAN) bytes.swap32();
        return new AllocationMap(words, sizeBytes, true);
      }
    } catch {
      // Missing or unreadable: unknown, which is always safe.
    }
    return AllocationMap.unknown(sizeBytes);
  }

  /**
   * Saves the map with the data file's current identity. Call it after the last write and its
   * flush, with nothing writing meanwhile. An unknown map is not saved (there is nothing to
   * keep), and whatever was saved before is removed so that it cannot be trusted later.
   */
  async save(mapFile: string, dataFile: string): Promise<void> {
    if (!this.known) {
      await fs.promises.rm(mapFile, { force: true });
      return;
    }
    const words = Buffer.from(this.words.buffer, this.words.byteOffset, this.words.byteLength);
    const copy = Buffer.from(words);
    if (BIG_ENDIAN) copy.swap32();
    const bits = copy.subarray(0, byteLength(this.sizeBytes));
    const body = {
      magic: MAGIC,
      sizeBytes: this.sizeBytes,
      extentBytes: EXTENT_BYTES,
      data: identityOf(dataFile),
      bits: bits.toString('base64'),
      checksum: digest(bits),
    };
    await writeFileAtomic(mapFile, JSON.stringify(body) + '\n');
  }

  /** A write is about to land in [offset, offset + length). */
  markWritten(offset: number, length: number): void {
    if (!this.known || length === 0) return;
    const first = Math.floor(offset / EXTENT_BYTES);
    const last = Math.floor((offset + length - 1) / EXTENT_BYTES);
    const firstWord = first >>> 5;
    const lastWord = last >>> 5;
    for (let w = firstWord; w <= lastWord; w++) {
      this.words[w] |= bitMask(w === firstWord ? first & 31 : 0, w === lastWord ? last & 31 : 31);
    }
  }

  /** Whether any byte of the range may hold data (always true while unknown). */
  mayHoldData(offset: number, length: number): boolean {
    return length > 0 && this.nextWritten(offset, offset + length) < offset + length;
  }

  /**
   * The first byte at or after `from` (and before `end`) in an extent that may hold data, or
   * `end` if the whole stretch was never written. Skips 32 extents per step, so the search
   * costs one step per 2 MiB of volume, not a step per extent.
   */
  nextWritten(from: number, end: number): number {
    return this.search(from, end, 0);
  }

  /** The first byte at or after `from` (and before `end`) in a never-written extent, or `end`. */
  nextUnwritten(from: number, end: number): number {
    return this.search(from, end, 0xffffffff);
  }

  /** The first byte in [from, end) whose extent's bit differs from `skip` (a word of 0s or 1s). */
  private search(from: number, end: number, skip: number): number {
    if (from >= end) return end;
    if (!this.known) return skip === 0 ? from : end;
    const first = Math.floor(from / EXTENT_BYTES);
    const stop = Math.min(this.extents, Math.ceil(end / EXTENT_BYTES));
    if (first >= stop) return end;
    const lastWord = (stop - 1) >>> 5;
    let w = first >>> 5;
    let word = ((this.words[w] ^ skip) & (0xffffffff << (first & 31))) >>> 0;
    while (word === 0) {
      if (++w > lastWord) return end;
      word = (this.words[w] ^ skip) >>> 0;
    }
    // word & -word isolates the lowest set bit; clz32 turns it into an index in one step.
    const extent = w * 32 + (31 - Math.clz32(word & -word));
    return extent >= stop ? end : Math.max(from, extent * EXTENT_BYTES);
  }
}

function digest(bits: Buffer): string {
  return createHash('sha256').update(bits).digest('hex');
}
