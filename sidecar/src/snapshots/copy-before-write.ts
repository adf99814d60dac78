// The step every overwrite of a volume file takes while the volume has snapshots: before the
// bytes change, the old contents of each 4 KiB block not yet saved since the newest snapshot
// are saved (durably) in that snapshot's log. Only the newest snapshot receives saved data, so
// a write costs the same with one snapshot or 250: an older snapshot reads a block from the
// first log, its own or a newer one's, that saved it, else from the volume.
//
// A write that can wait in the overwrite journal is admitted once the old data is written, not
// yet durable: it is told what to wait for before its new data may reach the volume file (see
// FileBlockDevice). Other writes are admitted once the old data is durable.
//
// It is also where a snapshot is cut: `cut` holds new overwrites, waits for those admitted to
// finish (saved and written, a deferred one included), switches the newest log, and releases —
// so a snapshot holds exactly the writes that completed before it, and no write straddles it.
//
// Every path that changes the file (client writes, a secondary's replicated and catch-up writes,
// zeroing) goes through FileBlockDevice, which asks here first: there is no way around it.
import type { AllocationMap } from '../store/allocation-map';
import { BLOCK, type SavedBlock, type SavedLog } from './saved-log';

/** What a deferred overwrite waits for before its new data may reach the volume file. */
export interface Deferral {
  /** The old data of every block the write covers is durable. */
  durable: Promise<void>;
  /** The log (its snapshot's id) and the end of the last record the write depends on. */
  logId: number;
  recordEnd: number;
}

/** What FileBlockDevice calls around every overwrite of its file. */
export interface OverwriteGuard {
  /**
   * Admits an overwrite of [offset, offset + length): undefined if it may start now, else a
   * promise that settles when it may (a cut in progress, old data being saved). With `defer`,
   * that is once the old data is written, and the promise gives the Deferral the new data must
   * wait for (undefined: nothing to wait for). Rejects — with LOCKSTEP_ERR_NO_SPACE when the
   * old data does not fit — and then the write must fail. Every call is paired with one
   * `overwritten()`, whatever happened, once the new data is written.
   */
  admit(offset: number, length: number, defer: boolean): Promise<Deferral | undefined> | undefined;
  overwritten(): void;
}

/** Reads the volume file itself, under any snapshot machinery. */
export type RawReader = (offset: number, target: Buffer) => Promise<void>;

const ZEROES = Buffer.alloc(BLOCK);

/** A save in progress: its record written (with the log's end after it), then durable. */
interface Saving {
  written: Promise<number>;
  durable: Promise<void>;
}

export class CopyBeforeWrite implements OverwriteGuard {
  /** The log receiving saved data; undefined while the volume has no snapshot. */
  private newest: SavedLog | undefined;
  /** Blocks whose old data is saved but not yet durable, so a second writer waits for it too. */
  private readonly saving = new Map<number, Saving>();
  private admitted = 0;
  private hold: Promise<void> | undefined;
  private idle: (() => void) | undefined;

  constructor(
    private readonly readRaw: RawReader,
    private readonly allocation: AllocationMap,
  ) {}

  get receiving(): SavedLog | undefined {
    return this.newest;
  }

  admit(offset: number, length: number, defer: boolean): Promise<Deferral | undefined> | undefined {
    if (this.hold) return this.hold.then(() => this.admit(offset, length, defer));
    this.admitted++;
    return this.newest && length > 0 ? this.save(this.newest, offset, length, defer) : undefined;
  }

  overwritten(): void {
    if (--this.admitted === 0 && this.idle) this.idle();
  }

  /**
   * Holds new overwrites, waits for the admitted ones, runs `switchTo` (which returns the log
   * that receives saved data from now on), releases. Returns how long writes were held.
   */
  async cut(switchTo: () => SavedLog | undefined | Promise<SavedLog | undefined>): Promise<number> {
    while (this.hold) await this.hold;
    const started = performance.now();
    let release!: () => void;
    this.hold = new Promise((r) => (release = r));
    try {
      if (this.admitted > 0) await new Promise<void>((r) => (this.idle = r));
      this.idle = undefined;
      this.newest = await switchTo();
    } finally {
      this.hold = undefined;
      release();
    }
    return performance.now() - started;
  }

  private async save(
    log: SavedLog,
    offset: number,
    length: number,
    defer: boolean,
  ): Promise<Deferral | undefined> {
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + length - 1) / BLOCK);
    let waits: Saving[] | undefined;
    let runStart = -1;
    const runs: [number, number][] = [];
    for (let b = first; b <= last; b++) {
      const inFlight = this.saving.get(b);
      const fresh = !inFlight && !log.index.has(b);
      if (inFlight && waits?.at(-1) !== inFlight) (waits ??= []).push(inFlight);
      if (fresh && runStart < 0) runStart = b;
      if (!fresh && runStart >= 0) {
        runs.push([runStart, b]);
        runStart = -1;
      }
    }
    if (runStart >= 0) runs.push([runStart, last + 1]);
    if (runs.length > 0) {
      const written = this.saveRuns(log, runs);
      const saving: Saving = { written, durable: written.then((end) => log.durableTo(end)) };
      for (const [from, to] of runs) for (let b = from; b < to; b++) this.saving.set(b, saving);
      const forget = () => {
        for (const [from, to] of runs)
          for (let b = from; b < to; b++) if (this.saving.get(b) === saving) this.saving.delete(b);
      };
      saving.durable.then(forget, forget);
      (waits ??= []).push(saving);
    }
    if (!waits) return undefined;
    if (!defer) {
      await Promise.all(waits.map((w) => w.durable));
      return undefined;
    }
    const ends = await Promise.all(waits.map((w) => w.written));
    return {
      durable: Promise.all(waits.map((w) => w.durable)).then(() => undefined),
      logId: log.description.id,
      recordEnd: Math.max(...ends),
    };
  }

  /**
   * Reads the old contents of the runs (never-written extents read as zeroes, unread) and writes
   * them to the log; gives the log's end after them.
   */
  private async saveRuns(log: SavedLog, runs: [number, number][]): Promise<number> {
    const blocks: SavedBlock[] = [];
    for (const [from, to] of runs) {
      if (!this.allocation.mayHoldData(from * BLOCK, (to - from) * BLOCK)) {
        for (let b = from; b < to; b++) blocks.push({ block: b, data: undefined });
        continue;
      }
      const old = Buffer.allocUnsafe((to - from) * BLOCK);
      await this.readRaw(from * BLOCK, old);
      for (let b = from; b < to; b++) {
        const data = old.subarray((b - from) * BLOCK, (b - from + 1) * BLOCK);
        // A block of zeroes is saved as a flag: sparse volumes cost no saved data.
        blocks.push({ block: b, data: data.equals(ZEROES) ? undefined : data });
      }
    }
    return log.write(blocks);
  }
}
