// A volume's snapshots: a chain of saved-data logs, oldest first, under <volume dir>/snapshots.
//
// The volume file stays the live image (reads of the volume never pay for snapshots). Snapshot
// k's contents at block b are the first saved copy of b in logs k, k+1, …, newest; if none saved
// it, b has not changed since k and the volume holds it. So the logs are the whole catalog: a
// snapshot exists once its log's header says it was cut (one sector written inside the cut; the
// file itself was made ahead, a spare), and a deleted one's header says so (durably) before its
// data is reclaimed:
//   - the oldest: unlinked, nothing older reads through it;
//   - a middle one: the blocks it saved that its predecessor lacks are copied into the
//     predecessor's log, in the background (writes never wait for it), then it is unlinked;
//   - the newest: the same copy, then a cut that makes the predecessor the receiving log.
// A crash at any step leaves the deleted log, and reclaiming resumes on open (copies are
// idempotent: a block already in the predecessor is never copied again).
//
// Rollback is a plan, not a mechanism: the blocks changed since the snapshot, and the
// snapshot's contents to write back through the volume's own write path (so it is replicated,
// and newer snapshots keep what it overwrites).
import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { fsyncDir, writeFileAtomic } from '../../../lib/atomic-file';
import type { AllocationMap } from '../store/allocation-map';
import { CopyBeforeWrite, type RawReader } from './copy-before-write';
import { BlockRuns } from './block-runs';
import { BLOCK, SavedLog, ioError, type SavedBlock } from './saved-log';

const NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;
const LOG_FILE = /^snap-(\d+)\.log$/;
const ROLLBACK_FILE = 'rollback.json';
/** Verification compares copies region by region, at this size. */
export const VERIFY_REGION = 1024 * 1024;
const DIGEST_BYTES = 16;
const zeroDigests = new Map<number, Buffer>();
function zeroDigest(length: number): Buffer {
  let d = zeroDigests.get(length);
  if (!d) {
    d = createHash('sha256').update(Buffer.alloc(length)).digest().subarray(0, DIGEST_BYTES);
    zeroDigests.set(length, d);
  }
  return d;
}
/** Blocks copied per step when reclaiming a deleted snapshot. */
const MERGE_STEP = 256;

export interface SnapshotInfo {
  id: number;
  /** The same on every copy of a replicated snapshot. */
  uid: string;
  name: string;
  label: string;
  createdAtMs: number;
  /** Bytes of old data this snapshot's log holds (what it costs on disk). */
  savedBytes: number;
}

interface Link {
  log: SavedLog;
  deleted: boolean;
}

export function validateSnapshotName(name: string, what = 'snapshot name'): void {
  if (!NAME_PATTERN.test(name)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid ${what} ${JSON.stringify(name)}: use 1-63 lowercase letters, digits, '-', '.', '_', ` +
        'starting and ending with a letter or digit',
    );
  }
}

/** How long a snapshot prepared for a primary's cut waits for it before it is dropped. */
const RESERVATION_MS = 30_000;

function notFound(volume: string, name: string): LockstepError {
  return new LockstepError(
    'LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND',
    `volume ${volume} has no snapshot ${JSON.stringify(name)}`,
  );
}

export class SnapshotCatalog {
  private chain: Link[];
  private reclaiming: Promise<void> | undefined;
  private reclaimAgain = false;
  /** Snapshot reads in progress: a log is closed only when none can still be reading it. */
  private reads = 0;
  private readsDone: (() => void)[] = [];
  private closed = false;
  private readonly digestCache = new Map<number, Buffer>();
  private readonly reserved = new Map<string, { log: SavedLog; timer: NodeJS.Timeout }>();
  private readonly changedCache = new Map<string, { key: string; runs: BlockRuns }>();
  /** Never reused while the agent runs: a reclaim in progress still removes its old id's file. */
  private nextId: number;
  private nextSeq: number;
  /** The log the next snapshot takes (see makeSpare). */
  private spare: Promise<SavedLog> | undefined;

  private constructor(
    private readonly volume: string,
    private readonly dir: string,
    readonly guard: CopyBeforeWrite,
    private readonly readRaw: RawReader,
    private readonly allocation: AllocationMap,
    private readonly volumeSize: number,
    private readonly log: Logger,
    chain: Link[],
  ) {
    this.chain = chain;
    this.nextId = Math.max(0, ...chain.map((l) => l.log.description.id)) + 1;
    this.nextSeq = Math.max(0, ...chain.map((l) => order(l.log))) + 1;
  }

  /**
   * Opens the snapshots of a volume (recovering logs cut short by a crash) and returns the
   * guard to install on its device before anything writes.
   */
  static async open(
    volume: string,
    volumeDir: string,
    volumeSize: number,
    readRaw: RawReader,
    allocation: AllocationMap,
    log: Logger,
  ): Promise<SnapshotCatalog> {
    const dir = path.join(volumeDir, 'snapshots');
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    const found: { id: number; file: string }[] = [];
    for (const entry of await fs.promises.readdir(dir)) {
      const m = LOG_FILE.exec(entry);
      if (m) found.push({ id: Number(m[1]), file: path.join(dir, entry) });
      else if (entry.startsWith('.')) await fs.promises.rm(path.join(dir, entry), { force: true });
    }
    const chain: Link[] = [];
    try {
      for (const f of found) {
        const log = await SavedLog.open(f.file);
        if (log.description.prepared) {
          // Prepared for a cut that never happened: no snapshot, nothing saved in it.
          await log.close();
          await fs.promises.rm(f.file, { force: true });
          continue;
        }
        chain.push({ log, deleted: log.description.deleted === true });
      }
      chain.sort((a, b) => order(a.log) - order(b.log));
    } catch (err) {
      for (const l of chain) await l.log.close();
      throw err;
    }
    const guard = new CopyBeforeWrite(readRaw, allocation);
    const catalog = new SnapshotCatalog(
      volume,
      dir,
      guard,
      readRaw,
      allocation,
      volumeSize,
      log,
      chain,
    );
    await guard.cut(() => chain.at(-1)?.log);
    return catalog;
  }

  /**
   * Starts the background work (a deleted snapshot's reclaim, the next snapshot's log): once
   * the volume file is what readers will see (see FileBlockDevice.adoptJournal).
   */
  start(): void {
    if (this.chain.some((l) => l.deleted)) void this.reclaim();
    this.spare = this.makeSpare();
  }

  /**
   * Whether the log of snapshot `id` holds its records up to `end` — or is gone (deleted, so
   * nothing depends on its data any more).
   */
  holdsRecord(id: number, end: number): boolean {
    const link = this.chain.find((l) => l.log.description.id === id);
    return !link || link.log.holds(end);
  }

  /** Visible snapshots, oldest first. */
  list(): SnapshotInfo[] {
    return this.chain.filter((l) => !l.deleted).map((l) => info(l.log));
  }

  get(name: string): SnapshotInfo {
    return info(this.link(name).log);
  }

  private link(name: string): Link {
    const link = this.chain.find((l) => !l.deleted && l.log.description.name === name);
    if (!link) throw notFound(this.volume, name);
    return link;
  }

  /**
   * Takes a snapshot: its log is made durable first, then the cut holds writes only long
   * enough to let the admitted ones finish and switch logs. Returns it with the hold time.
   */
  async create(
    name: string,
    label = '',
    uid: string = randomUUID(),
  ): Promise<SnapshotInfo & { holdMs: number }> {
    return this.cut(await this.prepare(name, label, uid));
  }

  /** The second half: the prepared log becomes the newest, at a cut. */
  async cut(prepared: SavedLog): Promise<SnapshotInfo & { holdMs: number }> {
    const holdMs = await this.guard.cut(async () => {
      await prepared.markCut(this.nextSeq++);
      return this.adopt(prepared);
    });
    // After the answer: making the next spare would only queue behind the cut's disk writes.
    if (!this.closed) this.spare ??= this.makeSpare();
    return { ...info(prepared), holdMs };
  }

  /**
   * A copy's half of a replicated cut, ahead of the primary's hold: the log is prepared now,
   * and `take` with the same uid only cuts it. Dropped if the cut does not come.
   */
  async reserve(name: string, label: string, uid: string): Promise<void> {
    const log = await this.prepare(name, label, uid);
    const timer = setTimeout(() => {
      if (this.reserved.get(uid)?.log !== log) return;
      this.reserved.delete(uid);
      void this.discard(log).catch(() => undefined);
    }, RESERVATION_MS);
    timer.unref();
    this.reserved.set(uid, { log, timer });
  }

  /** Cuts the snapshot reserved under `uid`, or takes it whole if none was. */
  async take(name: string, label: string, uid: string): Promise<SnapshotInfo & { holdMs: number }> {
    const reserved = this.reserved.get(uid);
    if (!reserved) return this.create(name, label, uid);
    this.reserved.delete(uid);
    clearTimeout(reserved.timer);
    return this.cut(reserved.log);
  }

  /** Forgets a prepared snapshot that was never cut (a group cut that gave up). */
  async discard(prepared: SavedLog): Promise<void> {
    await prepared.close();
    await fs.promises.rm(prepared.file, { force: true });
    await fsyncDir(this.dir);
  }

  /**
   * The first half of a snapshot: its durable, empty log, not yet in the chain. A consistency
   * group prepares every member before cutting any, so that the cuts themselves are instant.
   */
  async prepare(name: string, label: string, uid: string = randomUUID()): Promise<SavedLog> {
    validateSnapshotName(name);
    if (label) validateSnapshotName(label, 'label');
    if (this.closed)
      throw new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', `volume ${this.volume} is closed`);
    const taken = () => this.chain.some((l) => !l.deleted && l.log.description.name === name);
    const exists = () =>
      new LockstepError(
        'LOCKSTEP_ERR_SNAPSHOT_EXISTS',
        `volume ${this.volume} already has a snapshot ${JSON.stringify(name)}`,
      );
    if (taken()) throw exists();
    const spare = this.spare ?? this.makeSpare();
    this.spare = undefined;
    const log = await spare;
    if (taken()) {
      await this.discard(log);
      throw exists();
    }
    // Named in memory only: on disk it stays a prepared spare until the cut writes its header.
    Object.assign(log.description, { name, label, createdAtMs: Date.now(), uid });
    return log;
  }

  /**
   * An empty log made ahead (created, directory fsynced: the slow part of a snapshot, ~20 ms
   * on this disk), so that taking a snapshot costs one sector written at the cut. A spare left
   * by a crash is still marked prepared, and removed on open.
   */
  private makeSpare(): Promise<SavedLog> {
    const id = this.nextId++;
    const spare = (async () => {
      const log = await SavedLog.create(path.join(this.dir, `snap-${id}.log`), {
        id,
        name: '',
        label: '',
        createdAtMs: 0,
        uid: '',
        prepared: true,
      });
      await fsyncDir(this.dir);
      return log;
    })();
    spare.catch(() => undefined); // reported to the prepare that takes it
    return spare;
  }

  /** Run by the cut while writes are held: the log becomes the newest. */
  private adopt(log: SavedLog): SavedLog {
    this.chain.push({ log, deleted: false });
    return log;
  }

  /** Deletes a snapshot: hidden at once (durably), its data reclaimed in the background. */
  async delete(name: string): Promise<void> {
    const link = this.link(name);
    await link.log.describe({ ...link.log.description, deleted: true });
    link.deleted = true;
    await this.reclaim();
  }

  /**
   * Reclaims deleted snapshots. An unlink is awaited by the caller; a copy into a predecessor
   * runs to its end in the background, as does a second request made while one runs.
   */
  reclaim(): Promise<void> {
    if (this.reclaiming) {
      this.reclaimAgain = true;
      return Promise.resolve();
    }
    const run = (async () => {
      do {
        this.reclaimAgain = false;
        await this.reclaimAll();
      } while (this.reclaimAgain);
    })();
    this.reclaiming = run.finally(() => (this.reclaiming = undefined));
    this.reclaiming.catch((err: unknown) =>
      this.log.error(
        { volume: this.volume, err: errorMessage(err) },
        'reclaiming a deleted snapshot failed; retried on restart',
      ),
    );
    return Promise.resolve();
  }

  /** Waits until no reclaim is running (tests, close). */
  async settled(): Promise<void> {
    while (this.reclaiming) await this.reclaiming.catch(() => undefined);
  }

  private async reclaimAll(): Promise<void> {
    for (;;) {
      if (this.closed) return;
      const i = this.chain.findIndex((l) => l.deleted);
      if (i < 0) return;
      const link = this.chain[i];
      // Chains only grow at the end and only this loop removes links: the predecessor holds.
      const into = i > 0 ? this.chain[i - 1] : undefined;
      if (into) await this.copyMissing(link, into);
      if (this.guard.receiving === link.log) {
        // It still receives first writes: hand over to the predecessor under a cut, with the
        // blocks saved since the copy. Checked again inside: a create may have cut first.
        await this.guard.cut(async () => {
          const receiving = this.guard.receiving;
          if (receiving !== link.log) return receiving;
          if (!into) return undefined;
          await this.copyMissing(link, into);
          return into.log;
        });
      }
      // It receives nothing any more: what it saved until it stopped must be in the predecessor.
      if (into) await this.copyMissing(link, into);
      this.chain = this.chain.filter((l) => l !== link);
      this.digestCache.delete(link.log.description.id);
      await this.whenNoReads();
      await link.log.close();
      await fs.promises.rm(link.log.file, { force: true });
      await fsyncDir(this.dir);
      this.log.info(
        { volume: this.volume, snapshot: link.log.description.name },
        'deleted snapshot reclaimed',
      );
    }
  }

  private async copyMissing(from: Link, into: Link): Promise<void> {
    const missing = [...from.log.index.keys()]
      .filter((b) => !into.log.index.has(b))
      .sort((a, b) => a - b);
    for (let i = 0; i < missing.length; i += MERGE_STEP) {
      const blocks: SavedBlock[] = [];
      for (const block of missing.slice(i, i + MERGE_STEP)) {
        const data = Buffer.allocUnsafe(BLOCK);
        await from.log.read(block, data);
        blocks.push({ block, data: data.equals(ZEROES) ? undefined : data });
      }
      await into.log.append(blocks);
    }
  }

  private position(name: string): number {
    return this.chain.indexOf(this.link(name));
  }

  /**
   * Fills `target` with the snapshot's bytes at `offset`. The volume is read first and saved
   * blocks looked up after: a block saved (and then overwritten) meanwhile is in the index by
   * the time the volume changes, so the lookup finds it.
   */
  async read(name: string, offset: number, target: Buffer): Promise<void> {
    this.position(name); // an unknown snapshot fails before anything is read
    this.reads++;
    try {
      await this.readRaw(offset, target);
      // Positions are taken now, not before the await: a reclaim may have shortened the chain.
      const chain = this.chain.slice(this.position(name));
      const first = Math.floor(offset / BLOCK);
      const end = offset + target.length;
      // The saved blocks all at once: one at a time, a scan of a snapshot a busy volume has
      // overwritten much of waits a thread-pool round trip per block.
      const saved: Promise<void>[] = [];
      for (let b = first; b * BLOCK < end; b++) {
        const link = chain.find((l) => l.log.index.has(b));
        if (!link) continue;
        const start = Math.max(offset, b * BLOCK);
        const stop = Math.min(end, (b + 1) * BLOCK);
        saved.push(
          link.log.read(b, target.subarray(start - offset, stop - offset), start - b * BLOCK),
        );
      }
      // Every read settled before the log may close (a failure does not leave others running).
      for (const r of await Promise.allSettled(saved)) if (r.status === 'rejected') throw r.reason;
    } finally {
      if (--this.reads === 0) for (const done of this.readsDone.splice(0)) done();
    }
  }

  private whenNoReads(): Promise<void> {
    if (this.reads === 0) return Promise.resolve();
    return new Promise((resolve) => this.readsDone.push(resolve));
  }

  /** Blocks whose contents may differ between snapshot `older` and the newer `newer`. */
  changedBetween(older: string, newer: string): BlockRuns {
    const from = this.position(older);
    const to = this.position(newer);
    if (to <= from)
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `snapshot ${newer} of volume ${this.volume} is not newer than ${older}`,
      );
    return BlockRuns.union(this.chain.slice(from, to).map((l) => l.log.index));
  }

  /**
   * Blocks whose contents may differ between the snapshot and the volume now. Kept while no
   * log from the snapshot on has grown, so a backup paging through block status builds it once.
   */
  changedBlocks(name: string): BlockRuns {
    const links = this.chain.slice(this.position(name));
    const key = links.map((l) => `${l.log.description.id}:${l.log.index.size}`).join(',');
    const cached = this.changedCache.get(name);
    if (cached?.key === key) return cached.runs;
    const runs = BlockRuns.union(links.map((l) => l.log.index));
    this.changedCache.set(name, { key, runs });
    return runs;
  }

  // ---- verification ------------------------------------------------------------------------

  /**
   * SHA-256 (first 16 bytes) of each VERIFY_REGION of the snapshot, in order. A snapshot never
   * changes, so its digests are kept; a newer snapshot's are its predecessor's with only the
   * regions changed between them (the blocks the predecessor's log saved) hashed again.
   */
  async digests(name: string): Promise<Buffer> {
    const link = this.link(name);
    const cached = this.digestCache.get(link.log.description.id);
    if (cached) return cached;
    const size = this.volumeSize;
    const regions = Math.ceil(size / VERIFY_REGION);
    const at = this.chain.indexOf(link);
    // The nearest older snapshot whose digests are known, and the regions changed since.
    let base: Buffer | undefined;
    let from = at - 1;
    for (; from >= 0; from--) {
      base = this.digestCache.get(this.chain[from].log.description.id);
      if (base) break;
    }
    const stale = new Set<number>();
    if (base) {
      for (const l of this.chain.slice(from, at))
        for (const b of l.log.index.keys()) stale.add(Math.floor((b * BLOCK) / VERIFY_REGION));
    }
    const out = base ? Buffer.from(base) : Buffer.alloc(regions * DIGEST_BYTES);
    const buf = Buffer.allocUnsafe(VERIFY_REGION);
    for (let r = 0; r < regions; r++) {
      if (base && !stale.has(r)) continue;
      const start = r * VERIFY_REGION;
      const view = buf.subarray(0, Math.min(VERIFY_REGION, size - start));
      if (!base && !this.mayHoldDataAt(name, start, view.length)) {
        zeroDigest(view.length).copy(out, r * DIGEST_BYTES);
        continue;
      }
      await this.read(name, start, view);
      createHash('sha256')
        .update(view)
        .digest()
        .copy(out, r * DIGEST_BYTES, 0, DIGEST_BYTES);
      // Hashing a large volume must not starve the volume's own I/O.
      if (r % 64 === 63) await new Promise((resolve) => setImmediate(resolve));
    }
    this.digestCache.set(link.log.description.id, out);
    return out;
  }

  /** Whether the snapshot may hold data in the range (else it reads as zeroes). */
  mayHoldDataAt(name: string, offset: number, length: number): boolean {
    return this.mayHoldData(this.position(name), offset, length);
  }

  /** Whether the snapshot at chain position `at` may hold data in the range (else zeroes). */
  private mayHoldData(at: number, offset: number, length: number): boolean {
    if (this.allocation.mayHoldData(offset, length)) return true;
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + length - 1) / BLOCK);
    for (const l of this.chain.slice(at))
      for (let b = first; b <= last; b++) if (l.log.index.has(b)) return true;
    return false;
  }

  // ---- rollback, resumable ------------------------------------------------------------------

  /** Records that the volume is being rolled back to `name`, durably, before the first write. */
  async beginRollback(name: string): Promise<void> {
    this.link(name);
    const file = path.join(this.dir, ROLLBACK_FILE);
    try {
      await writeFileAtomic(file, JSON.stringify({ snapshot: name }));
    } catch (err) {
      throw ioError('write', file, err);
    }
  }

  async endRollback(): Promise<void> {
    await fs.promises.rm(path.join(this.dir, ROLLBACK_FILE), { force: true });
    await fsyncDir(this.dir);
  }

  /** The snapshot a crash interrupted rolling back to, if any. */
  interruptedRollback(): string | undefined {
    try {
      const { snapshot } = JSON.parse(
        fs.readFileSync(path.join(this.dir, ROLLBACK_FILE), 'utf8'),
      ) as {
        snapshot: string;
      };
      return snapshot;
    } catch {
      return undefined;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const spare = await this.spare?.catch(() => undefined);
    if (spare) await this.discard(spare);
    await this.settled();
    await this.whenNoReads();
    for (const l of this.chain) await l.log.close();
  }
}

const ZEROES = Buffer.alloc(BLOCK);

/** A log's place in the chain: the order of the cuts. */
function order(log: SavedLog): number {
  return log.description.seq ?? log.description.id;
}

function info(log: SavedLog): SnapshotInfo {
  const d = log.description;
  return {
    id: d.id,
    uid: d.uid ?? '',
    name: d.name,
    label: d.label,
    createdAtMs: d.createdAtMs,
    savedBytes: log.bytes,
  };
}
