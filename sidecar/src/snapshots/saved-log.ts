// One snapshot's saved data: an append-only log of the *old* contents of the blocks first
// overwritten after the snapshot was taken (copy-before-write), and the index rebuilt from it.
//
// Ordering is the whole point: the old data must be durable before the new data may reach the
// volume file, and the kernel's writeback keeps no order between two files. So an append is
// written (to the page cache: a SIGKILL no longer loses it) and then made durable by an
// fdatasync that every record written before it started shares (group commit): the caller
// overwrites the volume only after `durableTo` its record. A client write does not wait for
// that: its new data waits in the overwrite journal (see OverwriteJournal) and reaches the
// volume once its record is durable, so at queue depth 1 a first write costs page-cache writes,
// not a device flush.
//
// Records are appended past the end of the file. An fdatasync then also commits the
// filesystem's journal (~300 µs here against ~115 µs for blocks written before), but it is
// shared by every record written meanwhile, and no client write waits for it; zeroes written
// ahead to spare it cost twice the disk writes and, given back at the next snapshot, a
// truncate that stalled the cut.
//
// Layout: a 4 KiB header (magic, JSON description, CRC), then records:
//   u32 magic | u32 count | u32 crc32(durable .. data) | u32 dataBlocks
//   u48 durable | u16 0                      the log was durable up to here when it was written
//   count × (u48 block | u16 flags)          flags: ZERO — the block read as zeroes, no data
//   dataBlocks × 4 KiB                       in entry order
// A record is trusted only whole (CRC). A bad record is a torn tail — written, never made
// durable, so no volume write reached the disk after it, and the log ends before it — unless
// the next record says the log was durable past it: then it is damage, refused loudly.
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { writeWhole } from './whole-writes';

export const BLOCK = 4096;
const HEADER_BYTES = 4096;
const FILE_MAGIC = 'LSSAVED2';
const RECORD_MAGIC = 0x4c535231;
/** The fixed part of a record's head; the CRC covers what follows it. */
const RECORD_FIXED = 16;
const RECORD_HEAD = 24;
const ENTRY_BYTES = 8;
const FLAG_ZERO = 1;
/** A record carries at most this many blocks; a larger save is split. */
const MAX_RECORD_BLOCKS = 1024;

/** What the header says about the snapshot; the log is the snapshot's durable existence. */
export interface SnapshotDescription {
  id: number;
  name: string;
  label: string;
  createdAtMs: number;
  /**
   * The same on every copy of a replicated snapshot (the primary draws it): a copy of another
   * snapshot that happens to bear the name is never taken for this one.
   */
  uid: string;
  /**
   * Set while the log exists but the snapshot has not been cut (prepared ahead of a hold): a
   * log still prepared when the agent starts is removed, never taken for a snapshot.
   */
  prepared?: boolean;
  /** Deleted: hidden, its data being handed to its predecessor before the file goes. */
  deleted?: boolean;
  /**
   * Its place in the volume's chain, given at the cut (ids are given when a spare is made, and
   * two snapshots taken at once may cut in the other order).
   */
  seq?: number;
}

/** The header's description fits one sector, so rewriting it (at the cut) is atomic. */
const HEADER_SECTOR = 512;

function headerOf(description: SnapshotDescription): Buffer {
  const json = Buffer.from(JSON.stringify(description));
  if (json.length > HEADER_SECTOR - 16)
    throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', 'snapshot name or label too long');
  const header = Buffer.alloc(HEADER_SECTOR);
  header.write(FILE_MAGIC, 0, 'latin1');
  header.writeUInt32LE(json.length, 8);
  header.writeUInt32LE(crc32(json), 12);
  json.copy(header, 16);
  return header;
}

/** Where a saved block is: its data's offset in the log, or ZERO_BLOCK. */
export const ZERO_BLOCK = -1;

/** A block's old contents, or undefined when it read as zeroes. */
export interface SavedBlock {
  block: number;
  data: Buffer | undefined;
}

interface PendingAppend {
  blocks: SavedBlock[];
  resolve: (end: number) => void;
  reject: (err: Error) => void;
}

/** A failed file operation on snapshot data, with a full disk told apart (ENOSPC to clients). */
export function ioError(
  op: string,
  file: string,
  err: unknown,
  what = 'snapshot data',
): LockstepError {
  const code = (err as NodeJS.ErrnoException).code;
  return new LockstepError(
    code === 'ENOSPC' || code === 'EDQUOT' ? 'LOCKSTEP_ERR_NO_SPACE' : 'LOCKSTEP_ERR_IO',
    `${op} of ${what} ${file} failed: ${errorMessage(err)}`,
    { cause: err },
  );
}

function corrupt(file: string, what: string): LockstepError {
  return new LockstepError('LOCKSTEP_ERR_METADATA_CORRUPT', `snapshot data ${file}: ${what}`);
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())),
  );
}

/** Writes and makes durable: a header. */
async function writeDurably(fd: number, buffers: Buffer[], position: number): Promise<void> {
  await writeWhole(fd, buffers, position);
  await fdatasync(fd);
}

function pread(fd: number, target: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.read(fd, target, 0, target.length, position, (err, n) => {
      if (err) return reject(err);
      if (n !== target.length) return reject(new Error(`short read at ${position}`));
      resolve();
    }),
  );
}

export class SavedLog {
  /** Block number → offset of its saved data in the file, or ZERO_BLOCK. */
  readonly index = new Map<number, number>();
  private tail: number;
  private queue: PendingAppend[] = [];
  private writing = false;
  private closed = false;
  /** Records up to here are durable. */
  private syncedTo: number;
  /** The fdatasync running now, and the tail it covers. */
  private syncing: { done: Promise<void>; covers: number } | undefined;
  /** The first failed fdatasync: what it did not cover may never be durable, so none is said to be. */
  private syncError: LockstepError | undefined;

  private constructor(
    readonly file: string,
    private readonly fd: number,
    readonly description: SnapshotDescription,
    tail: number,
  ) {
    this.tail = tail;
    this.syncedTo = tail;
  }

  /** Creates the log of a new snapshot; durable (file and directory entry) when it resolves. */
  static async create(file: string, description: SnapshotDescription): Promise<SavedLog> {
    const header = Buffer.alloc(HEADER_BYTES);
    headerOf(description).copy(header);
    let fd: number;
    try {
      fd = fs.openSync(
        file,
        fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL,
        0o600,
      );
    } catch (err) {
      throw ioError('create', file, err);
    }
    try {
      await writeDurably(fd, [header], 0);
    } catch (err) {
      fs.closeSync(fd);
      fs.rmSync(file, { force: true });
      throw ioError('create', file, err);
    }
    return new SavedLog(file, fd, description, HEADER_BYTES);
  }

  /** Opens an existing log and rebuilds its index; a torn tail record is dropped. */
  static async open(file: string): Promise<SavedLog> {
    let fd: number;
    try {
      fd = fs.openSync(file, fs.constants.O_RDWR);
    } catch (err) {
      throw ioError('open', file, err);
    }
    try {
      const size = fs.fstatSync(fd).size;
      const header = Buffer.alloc(HEADER_BYTES);
      if (size < HEADER_BYTES) throw corrupt(file, 'shorter than its header');
      await pread(fd, header, 0);
      if (header.toString('latin1', 0, 8) !== FILE_MAGIC) throw corrupt(file, 'bad magic');
      const jsonLen = header.readUInt32LE(8);
      const json = header.subarray(16, 16 + jsonLen);
      if (jsonLen > HEADER_BYTES - 16 || crc32(json) !== header.readUInt32LE(12))
        throw corrupt(file, 'header checksum mismatch');
      const description = JSON.parse(json.toString('utf8')) as SnapshotDescription;
      const log = new SavedLog(file, fd, description, HEADER_BYTES);
      await log.replay(size);
      // Cut off what lies past the last whole record: records written after a torn one may
      // still be whole, and one must never be read as following a new record of the same length.
      if (size > log.tail) fs.ftruncateSync(fd, log.tail);
      // Records a killed agent wrote may be only in the page cache: durable from here on.
      await fdatasync(fd);
      log.syncedTo = log.tail;
      return log;
    } catch (err) {
      fs.closeSync(fd);
      throw err instanceof LockstepError ? err : ioError('open', file, err);
    }
  }

  /** The record at `pos` if it is whole (magic, bounds, CRC), else undefined. */
  private async recordAt(
    pos: number,
    size: number,
  ): Promise<{ count: number; length: number; durable: number; entries: Buffer } | undefined> {
    const head = await this.headAt(pos, size);
    if (!head || pos + head.length > size) return undefined;
    const body = Buffer.allocUnsafe(head.length - RECORD_FIXED);
    await pread(this.fd, body, pos + RECORD_FIXED);
    if (crc32(body) !== head.crc) return undefined;
    const fromEntries = RECORD_HEAD - RECORD_FIXED;
    return {
      count: head.count,
      length: head.length,
      durable: body.readUIntLE(0, 6),
      entries: body.subarray(fromEntries, fromEntries + head.count * ENTRY_BYTES),
    };
  }

  /** A plausible record header at `pos` (magic, counts in bounds): its length and CRC. */
  private async headAt(
    pos: number,
    size: number,
  ): Promise<{ count: number; length: number; crc: number } | undefined> {
    if (pos + RECORD_FIXED > size) return undefined;
    const head = Buffer.alloc(RECORD_FIXED);
    await pread(this.fd, head, pos);
    if (head.readUInt32LE(0) !== RECORD_MAGIC) return undefined;
    const count = head.readUInt32LE(4);
    const dataBlocks = head.readUInt32LE(12);
    if (count === 0 || count > MAX_RECORD_BLOCKS || dataBlocks > count) return undefined;
    const length = RECORD_HEAD + count * ENTRY_BYTES + dataBlocks * BLOCK;
    return { count, length, crc: head.readUInt32LE(8) };
  }

  private async replay(size: number): Promise<void> {
    let pos = HEADER_BYTES;
    for (;;) {
      const record = await this.recordAt(pos, size);
      if (!record) {
        if (await this.durableAfter(pos, size))
          throw corrupt(this.file, `record at byte ${pos} is damaged (records follow it)`);
        break;
      }
      const { count, length, entries } = record;
      let data = pos + RECORD_HEAD + count * ENTRY_BYTES;
      for (let i = 0; i < count; i++) {
        const block = entries.readUIntLE(i * ENTRY_BYTES, 6);
        const zero = (entries.readUInt16LE(i * ENTRY_BYTES + 6) & FLAG_ZERO) !== 0;
        this.index.set(block, zero ? ZERO_BLOCK : data);
        if (!zero) data += BLOCK;
      }
      pos += length;
    }
    this.tail = pos;
  }

  /**
   * Whether a bad record at `pos` was durable: it claims a length after which a whole record
   * follows that was written when the log was durable past `pos`.
   */
  private async durableAfter(pos: number, size: number): Promise<boolean> {
    const head = await this.headAt(pos, size);
    if (!head) return false;
    const next = await this.recordAt(pos + head.length, size);
    return next !== undefined && next.durable > pos;
  }

  /**
   * Replaces the description, durably, in one sector write: how a snapshot is named (a spare
   * log taken for it), cut and deleted without creating, renaming or fsyncing a directory.
   */
  async describe(next: SnapshotDescription): Promise<void> {
    try {
      await writeDurably(this.fd, [headerOf(next)], 0);
    } catch (err) {
      throw ioError('update', this.file, err);
    }
    Object.assign(this.description, next);
  }

  /** Records that the snapshot was cut, at `seq` in its chain: from now on it exists. */
  markCut(seq: number): Promise<void> {
    return this.describe({ ...this.description, prepared: undefined, seq });
  }

  /** Whether the log's records reach `end` (a record that ends there survived). */
  holds(end: number): boolean {
    return end <= this.tail;
  }

  /** Bytes of saved data (records included). */
  get bytes(): number {
    return this.tail - HEADER_BYTES;
  }

  /**
   * Appends the old contents of blocks not yet in the index; resolves once they are durable and
   * indexed. Blocks already saved are skipped (the first save of a block is the snapshot's).
   */
  async append(blocks: SavedBlock[]): Promise<void> {
    await this.durableTo(await this.write(blocks));
  }

  /**
   * Like `append`, but resolves once the blocks are written and indexed (readable, and safe
   * from a SIGKILL), with the end of the log after them: durable once `durableTo` that end.
   */
  write(blocks: SavedBlock[]): Promise<number> {
    if (this.closed)
      return Promise.reject(
        new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', `snapshot data ${this.file} is closed`),
      );
    return new Promise((resolve, reject) => {
      this.queue.push({ blocks, resolve, reject });
      if (!this.writing) void this.drain();
    });
  }

  /**
   * Resolves once the log is durable up to `end`: an fdatasync covers every record written
   * before it started, so records written meanwhile share the next one.
   */
  async durableTo(end: number): Promise<void> {
    while (this.syncedTo < end) {
      if (this.syncError) throw this.syncError;
      if (!this.syncing) {
        const covers = this.tail;
        const done = fdatasync(this.fd).then(
          () => {
            this.syncedTo = Math.max(this.syncedTo, covers);
            this.syncing = undefined;
          },
          (err: unknown) => {
            this.syncError ??= ioError('flush', this.file, err);
            this.syncing = undefined;
          },
        );
        this.syncing = { done, covers };
      }
      await this.syncing.done;
    }
  }

  private async drain(): Promise<void> {
    this.writing = true;
    while (this.queue.length > 0) {
      const batch = this.takeBatch();
      try {
        await this.writeRecord(batch.flatMap((p) => p.blocks));
        for (const p of batch) p.resolve(this.tail);
      } catch (err) {
        for (const p of batch) p.reject(err as Error);
      }
    }
    this.writing = false;
  }

  /** The queued appends that fit one record (at least one, however large). */
  private takeBatch(): PendingAppend[] {
    let blocks = 0;
    let n = 0;
    while (
      n < this.queue.length &&
      (n === 0 || blocks + this.queue[n].blocks.length <= MAX_RECORD_BLOCKS)
    ) {
      blocks += this.queue[n].blocks.length;
      n++;
    }
    return this.queue.splice(0, n);
  }

  private async writeRecord(all: SavedBlock[]): Promise<void> {
    const seen = new Set<number>();
    const fresh = all.filter((b) => {
      if (this.index.has(b.block) || seen.has(b.block)) return false;
      seen.add(b.block);
      return true;
    });
    for (let start = 0; start < fresh.length; start += MAX_RECORD_BLOCKS) {
      const blocks = fresh.slice(start, start + MAX_RECORD_BLOCKS);
      const entries = Buffer.alloc(blocks.length * ENTRY_BYTES);
      const data: Buffer[] = [];
      blocks.forEach((b, i) => {
        entries.writeUIntLE(b.block, i * ENTRY_BYTES, 6);
        if (b.data === undefined) entries.writeUInt16LE(FLAG_ZERO, i * ENTRY_BYTES + 6);
        else data.push(b.data);
      });
      const head = Buffer.alloc(RECORD_HEAD);
      head.writeUInt32LE(RECORD_MAGIC, 0);
      head.writeUInt32LE(blocks.length, 4);
      head.writeUIntLE(this.syncedTo, RECORD_FIXED, 6);
      let crc = crc32(head.subarray(RECORD_FIXED), 0);
      crc = crc32(entries, crc);
      for (const d of data) crc = crc32(d, crc);
      head.writeUInt32LE(crc, 8);
      head.writeUInt32LE(data.length, 12);
      const at = this.tail;
      const length = RECORD_HEAD + entries.length + data.length * BLOCK;
      try {
        await writeWhole(this.fd, [head, entries, ...data], at);
      } catch (err) {
        throw ioError('append', this.file, err);
      }
      this.tail = at + length;
      let offset = at + RECORD_HEAD + entries.length;
      for (const b of blocks) {
        this.index.set(b.block, b.data === undefined ? ZERO_BLOCK : offset);
        if (b.data !== undefined) offset += BLOCK;
      }
    }
  }

  /** Fills `target` (one block, or the part of one from `within`) with a saved block. */
  async read(block: number, target: Buffer, within = 0): Promise<void> {
    const at = this.index.get(block);
    if (at === undefined) throw new Error(`block ${block} is not saved in ${this.file}`);
    if (at === ZERO_BLOCK) {
      target.fill(0);
      return;
    }
    try {
      await pread(this.fd, target, at + within);
    } catch (err) {
      throw ioError('read', this.file, err);
    }
  }

  /** Waits for appends in progress, then closes the descriptor. */
  async close(): Promise<void> {
    this.closed = true;
    while (this.writing || this.syncing) {
      await this.syncing?.done;
      await new Promise((r) => setImmediate(r));
    }
    fs.closeSync(this.fd);
  }
}
