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
import { writeFileAtomic } from './atomic-file';

export const EXTENT_BYTES = 64 * 1024;
const MAGIC = 'lockstep-allocation-map-v1';

interface FileIdentity {
  ino: number;
  size: number;
  mtimeNs: string;
}

function identityOf(dataFile: string): FileIdentity {
  const st = fs.statSync(dataFile, { bigint: true });
  return { ino: Number(st.ino), size: Number(st.size), mtimeNs: String(st.mtimeNs) };
}

export class AllocationMap {
  private constructor(
    private readonly bits: Uint8Array,
    private readonly sizeBytes: number,
    /** False: what was written is unknown, and every extent counts as written. */
    readonly known: boolean,
  ) {}

  private static empty(sizeBytes: number): Uint8Array {
    return new Uint8Array(Math.ceil(Math.ceil(sizeBytes / EXTENT_BYTES) / 8));
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
        bits.length === AllocationMap.empty(sizeBytes).length &&
        saved.data.ino === current.ino &&
        saved.data.size === current.size &&
        saved.data.mtimeNs === current.mtimeNs;
      if (intact) return new AllocationMap(new Uint8Array(bits), sizeBytes, true);
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
    const bits = Buffer.from(this.bits.buffer, this.bits.byteOffset, this.bits.byteLength);
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
    const last = Math.floor((offset + length - 1) / EXTENT_BYTES);
    for (let e = Math.floor(offset / EXTENT_BYTES); e <= last; e++) {
      this.bits[e >> 3] = (this.bits[e >> 3] ?? 0) | (1 << (e & 7));
    }
  }

  /** Whether any byte of the range may hold data (always true while unknown). */
  mayHoldData(offset: number, length: number): boolean {
    if (!this.known) return true;
    if (length === 0) return false;
    const last = Math.floor((offset + length - 1) / EXTENT_BYTES);
    for (let e = Math.floor(offset / EXTENT_BYTES); e <= last; e++) {
      if (((this.bits[e >> 3] ?? 0) >> (e & 7)) & 1) return true;
    }
    return false;
  }
}

function digest(bits: Buffer): string {
  return createHash('sha256').update(bits).digest('hex');
}
