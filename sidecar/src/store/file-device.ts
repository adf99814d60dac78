// A BlockDevice over one preallocated-size (sparse) file.
import fs from 'node:fs';
import { LockstepError } from '../../../lib/errors';
import type { BlockDevice, MetaContexts, ZeroOptions } from '../block-device';
import type { Deferral, OverwriteGuard } from '../snapshots/copy-before-write';
import { OverwriteJournal, type JournalEntry } from '../snapshots/overwrite-journal';
import type { Backing } from '../snapshots/clone-backing';
import type { AllocationMap } from './allocation-map';
import { AllocationStatus } from './allocation-status';
import { DirectIo } from './direct-io';

const ZERO_CHUNK = 1 << 20;
const BLOCK = 4096;
const zeroes = Buffer.alloc(ZERO_CHUNK);

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fdatasync(fd, (err) => (err ? reject(ioError('fdatasync', err)) : resolve())),
  );
}

function ioError(op: string, err: NodeJS.ErrnoException): LockstepError {
  const code =
    err.code === 'ENOSPC' || err.code === 'EDQUOT' ? 'LOCKSTEP_ERR_NO_SPACE' : 'LOCKSTEP_ERR_IO';
  return new LockstepError(code, `${op} failed: ${err.message}`, { cause: err });
}

/** Writes up to this size go to the page cache synchronously, on the event loop. */
const SYNC_WRITE_MAX = 64 * 1024;

function pwrite(fd: number, data: Buffer, position: number): Promise<void> {
  // A small buffered write is a few-microsecond copy into the page cache; handing it to the
  // libuv thread pool costs more than the copy (measured: 4k random writes at queue depth 16
  // went from ~107k to ~180k IOPS). Large writes still go to the pool, so the event loop
  // never stalls on one for long.
  if (data.length <= SYNC_WRITE_MAX) {
    try {
      let done = 0;
      while (done < data.length)
        done += fs.writeSync(fd, data, done, data.length - done, position + done);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(ioError('write', err as NodeJS.ErrnoException));
    }
  }
  return new Promise((resolve, reject) => {
    const step = (done: number) => {
      fs.write(fd, data, done, data.length - done, position + done, (err, n) => {
        if (err) return reject(ioError('write', err));
        if (done + n < data.length) return step(done + n);
        resolve();
      });
    };
    step(0);
  });
}

function pread(fd: number, target: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number) => {
      fs.read(fd, target, done, target.length - done, position + done, (err, n) => {
        if (err) return reject(ioError('read', err));
        if (n === 0) {
          // Past EOF of a sparse file that was shortened behind our back: read as zeroes.
          target.fill(0, done);
          return resolve();
        }
        if (done + n < target.length) return step(done + n);
        resolve();
      });
    };
    step(0);
  });
}

export class FileBlockDevice implements BlockDevice {
  private closed = false;
  /** Operations started and not finished: the descriptor is closed only when none remain, so a
   * late write can never land in a file that reused the descriptor number. */
  private pending = 0;

  private direct: DirectIo | undefined | null = null;
  /**
   * The first failed fdatasync. Linux reports a writeback error to one fdatasync only, so a
   * flush that failed (even one nobody waited for) fails every later flush too: an error is
   * never lost, and the copy is never again said to be on disk.
   */
  private syncError: LockstepError | undefined;
  /** The fdatasync running now, if any, and the count of writes done when it started. */
  private runningSync: { done: Promise<void>; covers: number } | undefined;
  /** The next fdatasync, started when the running one ends: every flush called meanwhile's. */
  private queuedSync: Promise<void> | undefined;
  private syncCalls = 0;
  /** Writes finished since the file was opened, and writes started and not finished. */
  private writesDone = 0;
  private writesRunning = 0;
  /**
   * `writesDone` when the last fdatasync that succeeded started: those writes are durable. None
   * at first: what an earlier process wrote may still be only in the page cache.
   */
  private durableWrites = -1;
  /** Writes finished since the last flush, and how many the last flush followed. */
  private writesSinceFlush = 0;
  private writesPerFlush = 0;
  /** Asked before every overwrite of the file: where snapshots save old data first. */
  private guard: OverwriteGuard | undefined;
  /** Where writes wait for their old data to become durable (see OverwriteJournal). */
  private journal: OverwriteJournal | undefined;
  /** Blocks whose new data waits in the journal → when it has reached the file. */
  private readonly waiting = new Map<number, Promise<void>>();
  /** Every wait in progress: a flush covers the writes answered before it. */
  private readonly applying = new Set<Promise<void>>();
  /** A clone's snapshot: what the blocks it has not written yet read as. */
  private backing: Backing | undefined;
  /** `base:allocation`, from the allocation map, and what other layers add (snapshots). */
  private contexts: MetaContexts;

  constructor(
    private readonly fd: number,
    readonly size: number,
    readonly readOnly: boolean,
    /** The file's path, for a second, direct-I/O descriptor (see DirectIo). */
    private readonly file: string,
    /** Which extents were ever written: scans read those and skip the rest. */
    readonly allocation: AllocationMap,
  ) {
    this.contexts = new AllocationStatus(allocation, size);
  }

  private check(op: string, offset: number, length: number, writing: boolean): void {
    if (this.closed)
      throw new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', `${op} on a closed volume`);
    if (writing && this.readOnly)
      throw new LockstepError('LOCKSTEP_ERR_READ_ONLY', `${op} on a read-only volume`);
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new LockstepError(
        'LOCKSTEP_ERR_OUT_OF_RANGE',
        `${op} of ${length} bytes at ${offset} is outside the volume (${this.size} bytes)`,
      );
    }
  }

  private async guarded(work: () => Promise<void>): Promise<void> {
    this.pending++;
    try {
      await work();
    } finally {
      if (--this.pending === 0 && this.closed) this.closeFds();
    }
  }

  async read(offset: number, target: Buffer): Promise<void> {
    this.check('read', offset, target.length, false);
    const waiting = this.waitingFor(offset, target.length);
    if (waiting) await waiting;
    const backing = this.backing;
    if (backing)
      return this.guarded(() =>
        backing.readThrough(offset, target, () => pread(this.fd, target, offset)),
      );
    return this.guarded(() => pread(this.fd, target, offset));
  }

  /** Like `read`, but without filling the page cache: for scans over the whole volume. */
  async readUncached(offset: number, target: Buffer): Promise<void> {
    this.check('read', offset, target.length, false);
    const waiting = this.waitingFor(offset, target.length);
    if (waiting) await waiting;
    const backing = this.backing;
    if (backing)
      return this.guarded(() =>
        backing.readThrough(offset, target, () => this.preadUncached(offset, target)),
      );
    return this.guarded(() => this.preadUncached(offset, target));
  }

  /**
   * Reads for a scan (baseline, resync): extents never written are zeroes without a read, the
   * written ones come through the page cache (where recent data still is: far faster than the
   * disk). Where the allocation is unknown, everything is read directly, so that a sparse
   * file's holes do not fill the page cache.
   */
  async readForScan(offset: number, target: Buffer): Promise<void> {
    if (!this.allocation.known || this.backing) return this.readUncached(offset, target);
    this.check('read', offset, target.length, false);
    const waiting = this.waitingFor(offset, target.length);
    if (waiting) await waiting;
    return this.guarded(async () => {
      const end = offset + target.length;
      for (let pos = offset; pos < end;) {
        const data = this.allocation.nextWritten(pos, end);
        target.fill(0, pos - offset, data - offset);
        if (data === end) return;
        pos = this.allocation.nextUnwritten(data, end);
        await pread(this.fd, target.subarray(data - offset, pos - offset), data);
      }
    });
  }

  private preadUncached(offset: number, target: Buffer): Promise<void> {
    const direct = this.directIo();
    if (direct && DirectIo.aligned(offset, target.length)) return direct.read(offset, target);
    return pread(this.fd, target, offset);
  }

  private directIo(): DirectIo | undefined {
    if (this.direct === null) this.direct = DirectIo.open(this.file, !this.readOnly);
    return this.direct;
  }

  /** Bytes in an aligned buffer. */
  static readonly alignedBufferBytes = DirectIo.chunkBytes;

  /**
   * A buffer of `alignedBufferBytes` that `readUncached` fills without a copy (when direct I/O
   * is available), waiting for one if need be; hand it back with `releaseAlignedBuffer` once
   * nothing references it.
   */
  async alignedBuffer(): Promise<Buffer> {
    return (await this.directIo()?.acquire()) ?? Buffer.allocUnsafe(DirectIo.chunkBytes);
  }

  /**
   * An aligned buffer of `length` bytes that `writeAround` writes without a copy, if the range
   * allows direct I/O and one is free now; undefined otherwise (any buffer will do then). Hand
   * it back with `releaseAlignedBuffer`.
   */
  tryAlignedBuffer(offset: number, length: number): Buffer | undefined {
    if (this.readOnly || length > DirectIo.chunkBytes || !DirectIo.aligned(offset, length))
      return undefined;
    return this.directIo()?.tryAcquire()?.subarray(0, length);
  }

  /**
   * Takes back a buffer from `alignedBuffer` or `tryAlignedBuffer`; returns false for any other
   * buffer, which it leaves alone.
   */
  releaseAlignedBuffer(buf: Buffer): boolean {
    return this.direct?.release(buf) ?? false;
  }

  get metaContexts(): MetaContexts {
    return this.contexts;
  }

  /** Lets a layer offer more metadata contexts around the ones the file has. */
  wrapMetaContexts(wrap: (inner: MetaContexts) => MetaContexts): void {
    this.contexts = wrap(this.contexts);
  }

  /** Makes the device a clone's: unwritten blocks read from `backing` (undefined: it stands alone). */
  setBacking(backing: Backing | undefined): void {
    this.backing = backing;
  }

  /** Writes straight to the file, past the guards: a backing's own copies, which change no byte a reader sees. */
  writeBelow(offset: number, data: Buffer): Promise<void> {
    this.check('write', offset, data.length, true);
    return this.guarded(() => this.counted(() => pwrite(this.fd, data, offset)));
  }

  /** Installs the step every overwrite of the file takes first (see CopyBeforeWrite). */
  setOverwriteGuard(guard: OverwriteGuard): void {
    this.guard = guard;
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    this.check('write', offset, data.length, true);
    const waiting = this.waitingFor(offset, data.length);
    if (waiting) await waiting;
    return this.guarded(async () => {
      const deferred = await this.overwrite(
        offset,
        data.length,
        () => pwrite(this.fd, data, offset),
        data,
      );
      if (!fua) return;
      await deferred?.landed;
      await this.sync();
    });
  }

  /**
   * Every change to the file goes through here: the guard admits it (old data saved first, as
   * readers saw it: a clone's blocks not yet its own read through its snapshot), a clone's
   * backing readies the blocks (after the guard), the allocation map learns of it (after the
   * guard, which reads it as it was), then `work`, and the blocks become the clone's own once
   * `work` has landed (see CloneBacking). A client's write (`data`) whose old data is written
   * but not yet durable waits in the journal instead: it returns once the journal has it, with
   * the promise of its landing in the file.
   */
  private async overwrite(
    offset: number,
    length: number,
    work: () => Promise<void>,
    data?: Buffer,
  ): Promise<{ landed: Promise<void> } | undefined> {
    const guard = this.guard;
    const journal =
      data && !this.backing && OverwriteJournal.fits(length) ? this.journal : undefined;
    let handedOver = false;
    try {
      const admitted = guard?.admit(offset, length, journal !== undefined);
      const deferral = admitted && (await admitted);
      if (deferral && journal && data) {
        // From here `defer` calls `overwritten()`, once the data has landed or failed to.
        handedOver = true;
        return await this.defer(journal, offset, data, deferral);
      }
      const claimed = this.backing?.prepareOverwrite(offset, length);
      const settle = claimed && (await claimed);
      this.allocation.markWritten(offset, length);
      if (!settle) {
        await this.counted(work);
        return undefined;
      }
      let written = false;
      try {
        await this.counted(work);
        written = true;
      } finally {
        await settle(written);
      }
    } finally {
      if (!handedOver) guard?.overwritten();
    }
  }

  /**
   * Puts a copy of `data` (the caller's buffer goes back to its pool once answered) in the
   * journal; resolves once it is there, with the promise of its landing in the file (wrapped:
   * an async function's result would adopt it) after
   * `deferral.durable` and after any earlier wait on the same blocks. Reads and writes of those
   * blocks wait for it meanwhile, a flush for every one.
   */
  private async defer(
    journal: OverwriteJournal,
    offset: number,
    data: Buffer,
    deferral: Deferral,
  ): Promise<{ landed: Promise<void> }> {
    const copy = Buffer.from(data);
    const earlier = this.waitingFor(offset, copy.length);
    // Numbered in the order of this call, so a replay lands overlapping writes in this order.
    const journaled = journal.write(offset, copy, deferral.logId, deferral.recordEnd);
    // No room for the journal on a full disk: the write waits for its old data like any other.
    const inJournal = journaled.then(
      () => true,
      (err: LockstepError) => {
        if (err.code === 'LOCKSTEP_ERR_NO_SPACE') return false;
        throw err;
      },
    );
    this.pending++;
    const landed = inJournal.then(
      async (answered) => {
        if (answered) {
          try {
            await deferral.durable;
          } catch (err) {
            // The old data may never reach the disk: the snapshot is at risk after a power
            // loss, and the copy is never again said to be on disk. The write lands: it was
            // answered.
            this.syncError ??= err as LockstepError;
          }
        } else await deferral.durable;
        await earlier;
        try {
          await this.counted(() => pwrite(this.fd, copy, offset));
        } finally {
          // Retired even if it failed: a failed write fails every later flush (syncError), and
          // the entries after it must not wait for it forever.
          if (answered) {
            const seq = await journaled;
            journal.retire(seq);
            await journal.whenRetired(seq);
          }
        }
      },
      // Not journaled: the write fails, and its caller hears so.
      () => undefined,
    );
    const settled = landed.catch(async (err: LockstepError) => {
      // Answered but not in the file: the copy is never again said to be on disk. Not
      // answered: its caller hears of it.
      if (await inJournal) this.syncError ??= err;
    });
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + copy.length - 1) / BLOCK);
    for (let b = first; b <= last; b++) this.waiting.set(b, settled);
    this.applying.add(settled);
    void settled.finally(() => {
      for (let b = first; b <= last; b++)
        if (this.waiting.get(b) === settled) this.waiting.delete(b);
      this.applying.delete(settled);
      this.guard?.overwritten();
      if (--this.pending === 0 && this.closed) this.closeFds();
    });
    if (!(await inJournal)) await landed;
    this.allocation.markWritten(offset, copy.length);
    return { landed: settled };
  }

  /** When the writes waiting in the journal on blocks of the range have landed; undefined if none do. */
  private waitingFor(offset: number, length: number): Promise<unknown> | undefined {
    if (this.waiting.size === 0 || length === 0) return undefined;
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + length - 1) / BLOCK);
    const found = new Set<Promise<void>>();
    if (last - first < this.waiting.size) {
      for (let b = first; b <= last; b++) {
        const w = this.waiting.get(b);
        if (w) found.add(w);
      }
    } else {
      for (const [b, w] of this.waiting) if (b >= first && b <= last) found.add(w);
    }
    return found.size > 0 ? Promise.all(found) : undefined;
  }

  /**
   * Takes the volume's journal: first lands the writes it still holds (a killed agent's), in
   * order, those whose old data `survived` (a power loss may have taken it, and then the write
   * was never flushed either), and makes them durable. Says how many landed and were dropped.
   */
  async adoptJournal(
    journal: OverwriteJournal,
    waiting: JournalEntry[],
    survived: (logId: number, recordEnd: number) => boolean,
  ): Promise<{ landed: number; dropped: number }> {
    let landed = 0;
    try {
      for (const e of waiting) {
        if (!survived(e.logId, e.recordEnd)) continue;
        this.allocation.markWritten(e.offset, e.data.length);
        await pwrite(this.fd, e.data, e.offset);
        landed++;
      }
      if (waiting.length > 0) await fdatasync(this.fd);
      journal.settleReplay();
    } catch (err) {
      journal.close();
      throw err;
    }
    this.journal = journal;
    return { landed, dropped: waiting.length - landed };
  }

  /**
   * Writes data this copy will rarely read (a secondary's baseline and resync): from a buffer
   * of `tryAlignedBuffer`, around the page cache (see DirectIo); from any other, as `write`.
   * Durable, like any write, only after the next flush.
   */
  async writeAround(offset: number, data: Buffer): Promise<void> {
    const direct = this.directIo();
    if (!direct?.ownsChunk(data) || !DirectIo.aligned(offset, data.length))
      return this.write(offset, data, false);
    this.check('write', offset, data.length, true);
    const waiting = this.waitingFor(offset, data.length);
    if (waiting) await waiting;
    return this.guarded(async () => {
      await this.overwrite(offset, data.length, async () => {
        try {
          await direct.write(offset, data);
        } catch (err) {
          // A filesystem may refuse direct writes it accepted reads for: write through the cache.
          if ((err as NodeJS.ErrnoException).code !== 'EINVAL')
            throw ioError('write', err as NodeJS.ErrnoException);
          await pwrite(this.fd, data, offset);
        }
      });
    });
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    this.check('write-zeroes', offset, length, true);
    const waiting = this.waitingFor(offset, length);
    if (waiting) await waiting;
    return this.guarded(() => this.zero(offset, length, opts));
  }

  private async zero(offset: number, length: number, given: ZeroOptions): Promise<void> {
    // A clone's unwritten blocks hold the snapshot's data even where its file is a hole.
    const opts = this.backing ? { ...given, noHole: true } : given;
    // Node cannot punch holes (no fallocate), so zeroing writes zeroes. Where the range already
    // reads as zeroes (a hole, typically) and a hole is allowed, skip the write: the file stays
    // sparse, which matters for copies that arrive as zero runs (qemu-img convert, baselines).
    // Extents never written are known to read as zeroes without a read: a baseline's ZERO of a
    // terabyte that was never written costs a search of the allocation map, not a terabyte read.
    const end = offset + length;
    for (let pos = offset; pos < end;) {
      const data = opts.noHole ? pos : this.allocation.nextWritten(pos, end);
      if (data === end) break;
      pos = opts.noHole ? end : this.allocation.nextUnwritten(data, end);
      await this.zeroWritten(data, pos - data, opts.noHole);
    }
    if (opts.fua) await this.sync();
  }

  /** Zeroes a stretch that may hold data, skipping chunks that read as zeroes if holes are allowed. */
  private async zeroWritten(offset: number, length: number, noHole: boolean): Promise<void> {
    const reader = this.directIo();
    let scratch: Buffer | undefined;
    for (let pos = offset; pos < offset + length; pos += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, offset + length - pos);
      if (!noHole) {
        if (reader && DirectIo.aligned(pos, n)) {
          if (await reader.isZero(pos, n, zeroes)) continue;
        } else {
          scratch ??= Buffer.allocUnsafe(Math.min(length, ZERO_CHUNK));
          const view = scratch.subarray(0, n);
          await pread(this.fd, view, pos);
          if (view.equals(zeroes.subarray(0, n))) continue;
        }
      }
      await this.overwrite(pos, n, () => pwrite(this.fd, zeroes.subarray(0, n), pos));
    }
  }

  async trim(offset: number, length: number): Promise<void> {
    // Advisory by the NBD spec; without fallocate we cannot release the blocks, and leaving
    // the data in place keeps every replica byte-identical.
    this.check('trim', offset, length, true);
    return Promise.resolve();
  }

  async flush(): Promise<void> {
    if (this.closed)
      throw new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', 'flush on a closed volume');
    // A flush right after another keeps the rhythm the writes set.
    if (this.writesSinceFlush > 0) this.writesPerFlush = this.writesSinceFlush;
    this.writesSinceFlush = 0;
    // Started at once when nothing waits in the journal, so flushes called together share it.
    return this.guarded(() =>
      this.applying.size > 0 ? this.landed().then(() => this.sync()) : this.sync(),
    );
  }

  /**
   * Runs one write to the file, counted: what a running fdatasync covers, and when to start one
   * ahead of the flush a client's rhythm says is coming.
   */
  private async counted(work: () => Promise<void>): Promise<void> {
    this.writesRunning++;
    try {
      await work();
    } finally {
      this.writesRunning--;
      this.writesDone++;
      this.writesSinceFlush++;
    }
    this.syncAhead();
  }

  /**
   * A client that flushes after every N writes (a database's commit: N is often 1) flushed
   * after N the last time; once the N-th write of this round is done and no other is running,
   * the fdatasync its flush will need starts now instead of a round trip later. On a replica the
   * flush arrives a whole round trip after the write, so most of the fdatasync is over by then.
   * A wrong guess costs one fdatasync; a failed one fails the next flush (see `syncError`).
   * Nothing is written behind a client that does not flush: it may be rewriting the same pages
   * in the cache, and an fdatasync would turn every pass into disk writes.
   */
  private syncAhead(): void {
    if (
      this.writesSinceFlush !== this.writesPerFlush ||
      this.writesRunning > 0 ||
      this.runningSync ||
      this.closed
    )
      return;
    void this.guarded(() => this.startSync()).catch(() => {});
  }

  /** fdatasync calls made on the file since it was opened (flushes and FUA writes share them). */
  get syncs(): number {
    return this.syncCalls;
  }

  /**
   * Makes every write completed before this call durable, with as few fdatasyncs as that
   * allows. An fdatasync covers the writes completed before it started: a call while none runs
   * starts one, unless no write has completed since the last one that succeeded started; a call
   * while one runs shares it if no write has completed since it started, and otherwise waits
   * for the next one, started when it ends and shared by every such call. However many flushes
   * arrive at once, that is at most two fdatasyncs.
   */
  private sync(): Promise<void> {
    if (this.syncError) return Promise.reject(this.syncError);
    if (this.durableWrites === this.writesDone) return Promise.resolve();
    const running = this.runningSync;
    if (running && running.covers === this.writesDone) return running.done;
    if (this.queuedSync) return this.queuedSync;
    if (!running) return this.startSync();
    const next = () => this.startSync();
    this.queuedSync = running.done.then(next, next);
    return this.queuedSync;
  }

  private startSync(): Promise<void> {
    this.queuedSync = undefined;
    if (this.syncError) return Promise.reject(this.syncError);
    this.syncCalls++;
    const covers = this.writesDone;
    // The journal's retirements first: a replay must never land an older write over one flushed.
    const journal = this.journal;
    const done = (
      journal ? journal.syncRetired().then(() => fdatasync(this.fd)) : fdatasync(this.fd)
    ).then(
      () => {
        this.runningSync = undefined;
        this.durableWrites = covers;
      },
      (err: LockstepError) => {
        this.runningSync = undefined;
        this.syncError ??= err;
        throw err;
      },
    );
    this.runningSync = { done, covers };
    return done;
  }

  /** When every write waiting in the journal now has landed in the file (or failed to). */
  async landed(): Promise<void> {
    while (this.applying.size > 0) await Promise.all(this.applying);
  }

  /** Refuses new operations; the descriptor closes once the ones in progress finish. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.pending === 0) this.closeFds();
  }

  private closeFds(): void {
    fs.closeSync(this.fd);
    this.direct?.close();
    this.journal?.close();
  }
}
