// The new data of client writes that wait for their old data to become durable (see
// CopyBeforeWrite and FileBlockDevice). Such a write is answered once its old data is written to
// the snapshot's log and its new data here — both in the page cache, which a SIGKILL of the
// agent does not lose — and its new data reaches the volume file only after the log's next
// fdatasync, so the kernel can never write it back ahead of the old data it replaces. A first
// write after a snapshot then costs a read and two page-cache writes, not a device flush.
//
// When the agent starts, the entries not yet retired are written into the volume file, in
// order, if the log record each depends on survived (after a power loss it may not have: then
// neither did the write's claim to be on disk, since no flush had covered it).
//
// A retired entry must never be replayed over a later write: the header says which entries are
// retired, and FileBlockDevice makes the header durable before every fdatasync of the volume,
// so a flushed write is never overwritten by an older one at the next start.
//
// Layout: one sector of header, then a ring of entries from byte 4096, each 64-byte aligned:
//   header: "LSJRNL01" | u32 crc32(the rest) | u48 retired | u48 liveStart
//   entry:  u32 magic | u32 crc32(the rest, data included) | u48 seq | u48 offset | u32 length
//           | u32 logId | u48 recordEnd | u16 0 | data
// Entries are numbered without gaps; the first not retired (seq retired + 1) is at liveStart,
// each next one right after it, or at the ring's start when it did not fit before the end.
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import { LockstepError } from '../../../lib/errors';
import { ioError } from './saved-log';
import { writeWhole } from './whole-writes';

const MAGIC = 'LSJRNL01';
const HEADER_SECTOR = 512;
const RING_START = 4096;
const ENTRY_MAGIC = 0x4c534a45;
const ENTRY_HEAD = 40;
const ALIGN = 64;
/** The ring's size: far more than the writes one fdatasync of a log keeps waiting. */
export const JOURNAL_BYTES = 4 * 1024 * 1024;

/** A write waiting in the journal: where it goes in the volume, and the record it depends on. */
export interface JournalEntry {
  seq: number;
  offset: number;
  data: Buffer;
  logId: number;
  recordEnd: number;
}

interface Live {
  seq: number;
  start: number;
  retired: boolean;
}

function journalError(op: string, file: string, err: unknown): LockstepError {
  return ioError(op, file, err, 'overwrite journal');
}

function entrySize(length: number): number {
  return Math.ceil((ENTRY_HEAD + length) / ALIGN) * ALIGN;
}

export class OverwriteJournal {
  /** Entries written and not yet retired, oldest first. */
  private readonly live: Live[] = [];
  private tail: number;
  private nextSeq: number;
  private retiredThrough: number;
  /** Retirements the header records that no fdatasync has yet made durable. */
  private headerDirty = false;
  private syncing: Promise<void> | undefined;
  /** Writers waiting for room in the ring. */
  private roomWaiters: (() => void)[] = [];
  /** Landed entries waiting for every older one to be retired too (see `whenRetired`). */
  private retiredWaiters: { seq: number; resolve: () => void }[] = [];
  /** The entry being written: the next one starts after it. */
  private writing: Promise<void> = Promise.resolve();

  private constructor(
    readonly file: string,
    private readonly fd: number,
    retired: number,
    tail: number,
  ) {
    this.retiredThrough = retired;
    this.nextSeq = retired + 1;
    this.tail = tail;
  }

  /**
   * Opens the volume's journal (creating an empty one) and gives the entries not yet retired,
   * oldest first: `replay` them before anything reads or writes the volume.
   */
  static open(file: string): { journal: OverwriteJournal; waiting: JournalEntry[] } {
    let fd: number;
    try {
      fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    } catch (err) {
      throw journalError('open', file, err);
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size === 0) {
        fs.ftruncateSync(fd, JOURNAL_BYTES);
        const journal = new OverwriteJournal(file, fd, 0, RING_START);
        journal.writeHeader();
        fs.fdatasyncSync(fd);
        return { journal, waiting: [] };
      }
      if (size !== JOURNAL_BYTES)
        throw new LockstepError(
          'LOCKSTEP_ERR_METADATA_CORRUPT',
          `overwrite journal ${file} is ${size} bytes, not ${JOURNAL_BYTES}`,
        );
      const header = Buffer.alloc(HEADER_SECTOR);
      fs.readSync(fd, header, 0, HEADER_SECTOR, 0);
      if (
        header.toString('latin1', 0, 8) !== MAGIC ||
        crc32(header.subarray(12, 24)) !== header.readUInt32LE(8)
      )
        throw new LockstepError(
          'LOCKSTEP_ERR_METADATA_CORRUPT',
          `overwrite journal ${file}: header damaged`,
        );
      const retired = header.readUIntLE(12, 6);
      const liveStart = header.readUIntLE(18, 6);
      const waiting: JournalEntry[] = [];
      let pos = liveStart;
      for (let seq = retired + 1; ; seq++) {
        const here = OverwriteJournal.entryAt(fd, pos, seq);
        const found = here ?? OverwriteJournal.entryAt(fd, RING_START, seq);
        if (!found) break;
        waiting.push(found.entry);
        pos = found.next;
      }
      const journal = new OverwriteJournal(file, fd, retired, pos);
      journal.nextSeq = retired + waiting.length + 1;
      return { journal, waiting };
    } catch (err) {
      fs.closeSync(fd);
      throw err instanceof LockstepError ? err : journalError('open', file, err);
    }
  }

  /** The entry numbered `seq` at `pos` if it is whole, and where the next one would start. */
  private static entryAt(
    fd: number,
    pos: number,
    seq: number,
  ): { entry: JournalEntry; next: number } | undefined {
    if (pos < RING_START || pos + ENTRY_HEAD > JOURNAL_BYTES) return undefined;
    const head = Buffer.alloc(ENTRY_HEAD);
    fs.readSync(fd, head, 0, ENTRY_HEAD, pos);
    if (head.readUInt32LE(0) !== ENTRY_MAGIC || head.readUIntLE(8, 6) !== seq) return undefined;
    const length = head.readUInt32LE(20);
    if (pos + entrySize(length) > JOURNAL_BYTES) return undefined;
    const data = Buffer.alloc(length);
    fs.readSync(fd, data, 0, length, pos + ENTRY_HEAD);
    if (crc32(data, crc32(head.subarray(8))) !== head.readUInt32LE(4)) return undefined;
    return {
      entry: {
        seq,
        offset: head.readUIntLE(14, 6),
        data,
        logId: head.readUInt32LE(24),
        recordEnd: head.readUIntLE(28, 6),
      },
      next: pos + entrySize(length),
    };
  }

  /** Whether a write of `length` bytes may wait here (a larger one waits for its old data). */
  static fits(length: number): boolean {
    return entrySize(length) <= (JOURNAL_BYTES - RING_START) / 4;
  }

  /**
   * Records every entry found as retired, durably: call once the replayed ones are durable in
   * the volume file. Numbering goes on past any number an entry left in the ring could bear:
   * after a torn entry, the ones written after it are still there, and one must never pass for
   * a new entry of the same number written where it lies.
   */
  settleReplay(): void {
    this.retiredThrough = this.nextSeq - 1 + JOURNAL_BYTES / ALIGN;
    this.nextSeq = this.retiredThrough + 1;
    this.writeHeader();
    fs.fdatasyncSync(this.fd);
  }

  /**
   * Writes a waiting write's new data (to the page cache: safe from a SIGKILL); resolves with
   * its number once written, after waiting for room if the ring is full. One at a time, so a
   * write that fails takes its number and space back and leaves no gap in the numbering.
   */
  write(offset: number, data: Buffer, logId: number, recordEnd: number): Promise<number> {
    const written = this.writing.then(() => this.writeNext(offset, data, logId, recordEnd));
    this.writing = written.then(
      () => undefined,
      () => undefined,
    );
    return written;
  }

  private async writeNext(
    offset: number,
    data: Buffer,
    logId: number,
    recordEnd: number,
  ): Promise<number> {
    const size = entrySize(data.length);
    let at = this.room(size);
    while (at === undefined) {
      await new Promise<void>((r) => this.roomWaiters.push(r));
      at = this.room(size);
    }
    const seq = this.nextSeq;
    const head = Buffer.alloc(ENTRY_HEAD);
    head.writeUInt32LE(ENTRY_MAGIC, 0);
    head.writeUIntLE(seq, 8, 6);
    head.writeUIntLE(offset, 14, 6);
    head.writeUInt32LE(data.length, 20);
    head.writeUInt32LE(logId, 24);
    head.writeUIntLE(recordEnd, 28, 6);
    head.writeUInt32LE(crc32(data, crc32(head.subarray(8))), 4);
    try {
      await writeWhole(this.fd, [head, data], at);
    } catch (err) {
      throw journalError('write', this.file, err);
    }
    this.nextSeq = seq + 1;
    this.live.push({ seq, start: at, retired: false });
    this.tail = at + size;
    return seq;
  }

  /** Where an entry of `size` bytes fits now, if anywhere. */
  private room(size: number): number | undefined {
    const oldest = this.live[0]?.start;
    if (oldest === undefined || this.tail >= oldest) {
      // Free: from the tail to the end, then from the ring's start to the oldest entry. Never
      // up to the oldest exactly: a full ring and an empty one would look the same.
      if (this.tail + size <= JOURNAL_BYTES) return this.tail;
      if (oldest === undefined || RING_START + size < oldest) return RING_START;
      return undefined;
    }
    return this.tail + size < oldest ? this.tail : undefined;
  }

  /** The entry's data is in the volume file: it is never replayed again. */
  retire(seq: number): void {
    const entry = this.live.find((l) => l.seq === seq);
    if (!entry) return;
    entry.retired = true;
    let popped = false;
    while (this.live[0]?.retired) {
      this.retiredThrough = this.live.shift()!.seq;
      popped = true;
    }
    if (!popped) return;
    this.writeHeader();
    this.headerDirty = true;
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    for (const w of waiters) w();
    const through = this.retiredThrough;
    const ready = this.retiredWaiters.filter((w) => w.seq <= through);
    if (ready.length === 0) return;
    this.retiredWaiters = this.retiredWaiters.filter((w) => w.seq > through);
    for (const w of ready) w.resolve();
  }

  /**
   * Undefined once the header says entry `seq` is retired, else when it will. Entries land out
   * of order now and then (each waits for its own log record), and the header only passes an
   * entry once every older one has landed: until then a replay would land this one again, so
   * nothing may overwrite its blocks.
   */
  whenRetired(seq: number): Promise<void> | undefined {
    if (seq <= this.retiredThrough) return undefined;
    return new Promise((resolve) => this.retiredWaiters.push({ seq, resolve }));
  }

  /** Makes the retirements so far durable; FileBlockDevice calls it before syncing the volume. */
  async syncRetired(): Promise<void> {
    while (this.headerDirty) {
      if (this.syncing) {
        await this.syncing;
        continue;
      }
      this.headerDirty = false;
      this.syncing = new Promise<void>((resolve, reject) =>
        fs.fdatasync(this.fd, (err) =>
          err ? reject(journalError('flush', this.file, err)) : resolve(),
        ),
      ).finally(() => (this.syncing = undefined));
      try {
        await this.syncing;
      } catch (err) {
        this.headerDirty = true;
        throw err;
      }
    }
  }

  /** One sector: atomic on disk. */
  private writeHeader(): void {
    const header = Buffer.alloc(HEADER_SECTOR);
    header.write(MAGIC, 0, 'latin1');
    header.writeUIntLE(this.retiredThrough, 12, 6);
    header.writeUIntLE(this.live[0]?.start ?? this.tail, 18, 6);
    header.writeUInt32LE(crc32(header.subarray(12, 24)), 8);
    fs.writeSync(this.fd, header, 0, HEADER_SECTOR, 0);
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
