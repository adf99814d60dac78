// A clone: a new volume that starts as a snapshot of another, usable at once. Its file starts
// empty; a block it has not written yet reads from the snapshot (redirect-on-write), and a
// background copy fills in the rest (hydration) until the clone stands alone and the snapshot
// may go.
//
// Which blocks the clone holds itself is the `present` log (a SavedLog of flag-only entries,
// made durable like any saved data), and a block is recorded present durably *after* the clone's own
// data has landed on it and before the write is answered: after a crash, a block either reads
// from the snapshot (not recorded: its write was never answered, and the snapshot still has
// its old contents) or from the file (recorded, so its write landed). Recorded first, a block
// whose write the crash cut off would read as the file's hole: zeroes the clone never held. A
// write that covers part of a block first copies the snapshot's block in, so the rest of it
// stays right.
//
// Hydration copies one chunk at a time. Blocks are made the clone's own by one party at a time:
// a write to a chunk being copied waits for that chunk, the copy of a chunk waits for the writes
// that claimed blocks in it before it started, and a write waits for another claiming the same
// blocks (writes to one block reach the device concurrently when nothing above orders them), so
// neither a copy nor a partial block's fill from the snapshot can land over newer data.
import fs from 'node:fs';
import path from 'node:path';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { writeFileAtomic, fsyncDir } from '../../../lib/atomic-file';
import type { SnapshotCatalog } from './snapshot-catalog';
import { BLOCK, SavedLog } from './saved-log';

const CLONE_FILE = 'clone.json';
const PRESENT_LOG = 'present.log';
/** Blocks hydrated per step: one read of the snapshot, one write, one present record. */
const HYDRATE_BLOCKS = 256;

export interface CloneSource {
  volume: string;
  snapshot: string;
}

/**
 * Ends a write's claim once its data is in the file (`written`): the blocks become the clone's
 * own, durably; or, the write having failed, releases them as they were.
 */
export type SettleOverwrite = (written: boolean) => Promise<void>;

/** What the clone's device calls: reads fill from the snapshot, writes prepare first. */
export interface Backing {
  /** Overlays the snapshot's bytes on the blocks of [offset, +target) the clone lacks. */
  readThrough(offset: number, target: Buffer, readFile: () => Promise<void>): Promise<void>;
  /**
   * Readies [offset, +length) for the clone's own data (partial blocks filled in from the
   * snapshot first): undefined if the blocks are its own already, else the settle step to call
   * once the write is over, whatever happened.
   */
  prepareOverwrite(offset: number, length: number): Promise<SettleOverwrite> | undefined;
}

export function cloneSourceOf(volumeDir: string): CloneSource | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(volumeDir, CLONE_FILE), 'utf8')) as CloneSource;
  } catch {
    return undefined;
  }
}

/** Blocks [first, last] being copied or claimed, and when that is over. */
interface Busy {
  first: number;
  last: number;
  done: Promise<void>;
}

function busy(first: number, last: number): Busy & { end: () => void } {
  let end!: () => void;
  const done = new Promise<void>((resolve) => (end = resolve));
  return { first, last, done, end };
}

const overlaps = (b: Busy, first: number, last: number) => b.first <= last && first <= b.last;

export class CloneBacking implements Backing {
  private hydrating: Busy | undefined;
  /** Writes between deciding which of their blocks are missing and recording them present. */
  private readonly claims = new Set<Busy>();
  private stopped = false;
  private running: Promise<void> | undefined;
  private standalone = false;

  private constructor(
    readonly source: CloneSource,
    private readonly dir: string,
    private readonly snapshots: SnapshotCatalog,
    private readonly present: SavedLog,
    private readonly blocks: number,
    private readonly writeFile: (offset: number, data: Buffer) => Promise<void>,
    private readonly flushFile: () => Promise<void>,
    private readonly log: Logger,
    private readonly onStandalone: () => void,
  ) {}

  /** Records a new clone's source durably: from then on the volume reads through it. */
  static async create(volumeDir: string, source: CloneSource): Promise<void> {
    await SavedLog.create(path.join(volumeDir, PRESENT_LOG), {
      id: 0,
      name: 'present',
      label: '',
      createdAtMs: Date.now(),
      uid: '',
    }).then((l) => l.close());
    await writeFileAtomic(path.join(volumeDir, CLONE_FILE), JSON.stringify(source));
  }

  static async open(
    volumeDir: string,
    source: CloneSource,
    snapshots: SnapshotCatalog,
    size: number,
    writeFile: (offset: number, data: Buffer) => Promise<void>,
    flushFile: () => Promise<void>,
    log: Logger,
    onStandalone: () => void,
  ): Promise<CloneBacking> {
    snapshots.get(source.snapshot); // its snapshot must exist: else the clone cannot be served
    const present = await SavedLog.open(path.join(volumeDir, PRESENT_LOG));
    return new CloneBacking(
      source,
      volumeDir,
      snapshots,
      present,
      Math.ceil(size / BLOCK),
      writeFile,
      flushFile,
      log,
      onStandalone,
    );
  }

  /** Blocks the clone holds itself, out of all. */
  get progress(): { present: number; blocks: number } {
    return { present: this.present.index.size, blocks: this.blocks };
  }

  private has(block: number): boolean {
    return this.present.index.has(block);
  }

  async readThrough(offset: number, target: Buffer, readFile: () => Promise<void>): Promise<void> {
    // Which blocks are missing is decided before the file is read: a block that becomes present
    // meanwhile reads as the snapshot (its old value), never as a hole.
    const first = Math.floor(offset / BLOCK);
    const end = offset + target.length;
    const missing: number[] = [];
    for (let b = first; b * BLOCK < end; b++) if (!this.has(b)) missing.push(b);
    await readFile();
    for (let i = 0; i < missing.length;) {
      let j = i + 1;
      while (j < missing.length && missing[j] === missing[j - 1] + 1) j++;
      const start = Math.max(offset, missing[i] * BLOCK);
      const stop = Math.min(end, (missing[j - 1] + 1) * BLOCK);
      await this.snapshots.read(
        this.source.snapshot,
        start,
        target.subarray(start - offset, stop - offset),
      );
      i = j;
    }
  }

  prepareOverwrite(offset: number, length: number): Promise<SettleOverwrite> | undefined {
    if (length === 0) return undefined;
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + length - 1) / BLOCK);
    let all = true;
    for (let b = first; b <= last && all; b++) all = this.has(b);
    if (all) return undefined;
    return this.claim(offset, length, first, last);
  }

  private async claim(
    offset: number,
    length: number,
    first: number,
    last: number,
  ): Promise<SettleOverwrite> {
    for (let b = this.busyOn(first, last); b; b = this.busyOn(first, last)) await b.done;
    // From here until the write is settled, hydration and other writes keep off its blocks (no
    // await since the check).
    const claim = busy(first, last);
    this.claims.add(claim);
    const release = () => {
      this.claims.delete(claim);
      claim.end();
    };
    try {
      // The partly covered end blocks keep the snapshot's bytes around the write.
      for (const b of new Set([first, last])) {
        const whole = offset <= b * BLOCK && offset + length >= (b + 1) * BLOCK;
        if (whole || this.has(b)) continue;
        const data = Buffer.allocUnsafe(BLOCK);
        await this.snapshots.read(this.source.snapshot, b * BLOCK, data);
        await this.writeFile(b * BLOCK, data);
      }
    } catch (err) {
      release();
      throw err;
    }
    return async (written) => {
      try {
        if (!written) return;
        const fresh: { block: number; data: undefined }[] = [];
        for (let b = first; b <= last; b++)
          if (!this.has(b)) fresh.push({ block: b, data: undefined });
        if (fresh.length > 0) await this.present.append(fresh);
      } finally {
        release();
      }
    };
  }

  /** The chunk being copied or a write claiming blocks in [first, last], if any. */
  private busyOn(first: number, last: number): Busy | undefined {
    const h = this.hydrating;
    return h && overlaps(h, first, last) ? h : this.claimOn(first, last);
  }

  /** A write claiming blocks in [first, last], if any. */
  private claimOn(first: number, last: number): Busy | undefined {
    for (const c of this.claims) if (overlaps(c, first, last)) return c;
    return undefined;
  }

  /** Copies what the clone lacks, chunk by chunk, until it stands alone. */
  startHydration(): void {
    this.running ??= this.hydrate().catch((err: unknown) =>
      this.log.error({ err: errorMessage(err) }, 'clone hydration stopped; resumed on restart'),
    );
  }

  private async hydrate(): Promise<void> {
    const buf = Buffer.allocUnsafe(HYDRATE_BLOCKS * BLOCK);
    for (let first = 0; first < this.blocks && !this.stopped; first += HYDRATE_BLOCKS) {
      const last = Math.min(this.blocks, first + HYDRATE_BLOCKS) - 1;
      // Announced first, so writes arriving from now on wait for this chunk (a stream of writes
      // cannot hold it off); the writes claiming blocks here already finish claiming them.
      const chunk = busy(first, last);
      this.hydrating = chunk;
      try {
        for (let c = this.claimOn(first, last); c; c = this.claimOn(first, last)) await c.done;
        const missing: { block: number; data: undefined }[] = [];
        for (let b = first; b <= last; b++)
          if (!this.has(b)) missing.push({ block: b, data: undefined });
        if (missing.length === 0) continue;
        const view = buf.subarray(0, (last - first + 1) * BLOCK);
        // Never-written stretches of the source are zeroes: nothing to copy, only to record.
        const copying = this.snapshots.mayHoldDataAt(
          this.source.snapshot,
          first * BLOCK,
          view.length,
        );
        if (copying) {
          await this.snapshots.read(this.source.snapshot, first * BLOCK, view);
          for (let i = 0; i < missing.length;) {
            let j = i + 1;
            while (j < missing.length && missing[j].block === missing[j - 1].block + 1) j++;
            const from = missing[i].block - first;
            const to = missing[j - 1].block - first + 1;
            await this.writeFile(missing[i].block * BLOCK, view.subarray(from * BLOCK, to * BLOCK));
            i = j;
          }
        }
        // Copied data must be on disk before the record says the snapshot is no longer needed
        // for it: after a power loss, a block recorded present but not written reads zeroes.
        if (copying) await this.flushFile();
        await this.present.append(missing);
      } finally {
        this.hydrating = undefined;
        chunk.end();
      }
      // A background copy: the clone's and the source's own I/O go first.
      await new Promise((resolve) => setImmediate(resolve));
    }
    if (!this.stopped && this.present.index.size >= this.blocks) await this.standAlone();
  }

  /** Everything is the clone's own: the snapshot is no longer needed. */
  private async standAlone(): Promise<void> {
    await this.flushFile();
    await fs.promises.rm(path.join(this.dir, CLONE_FILE), { force: true });
    await fsyncDir(this.dir);
    this.standalone = true;
    await this.present.close();
    await fs.promises.rm(path.join(this.dir, PRESENT_LOG), { force: true });
    this.log.info(
      { source: `${this.source.volume}@${this.source.snapshot}` },
      'clone hydrated: it stands alone',
    );
    this.onStandalone();
  }

  get isStandalone(): boolean {
    return this.standalone;
  }

  async close(): Promise<void> {
    this.stopped = true;
    await this.running;
    if (!this.standalone) await this.present.close();
  }
}

export function cloneNeeds(source: CloneSource, volume: string, snapshot: string): boolean {
  return source.volume === volume && source.snapshot === snapshot;
}

export function snapshotNeeded(volume: string, snapshot: string, clone: string): LockstepError {
  return new LockstepError(
    'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
    `snapshot ${volume}@${snapshot} is the source of clone ${clone}, which still reads from it; ` +
      'wait until the clone is hydrated (see its status) or delete the clone',
  );
}
