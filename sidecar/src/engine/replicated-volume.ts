// The splitter: a volume as the NBD frontend sees it (a BlockDevice), fanning every write out
// to the local file and to each peer in parallel and answering once the mode's rule is met.
// It also owns the volume's role (primary / secondary), the peers' links and their tracking.
//
// Write path on a primary with peers:
//   1. wait for overlapping writes (region locks: same order on every copy)
//   2. activity log: a cold extent is logged durably first
//   3. local write and every peer's send start together
//   4. reply when local + every in-sync peer acknowledged (sync), or local alone (async);
//      a peer that cannot take the write gets it marked in its dirty bitmap (sync, async) or
//      fails the write (strict-sync). `missed()` owns that policy.
import { randomBytes, randomUUID } from 'node:crypto';
import { readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { OpFlag, OpKind, TOKEN_BYTES } from '../replication/frames';
import { advance, ZERO_GENERATION, type Generations } from '../replication/generations';
import { PeerLink, type PeerState } from '../replication/peer-link';
import type { PeerHost } from '../replication/peer-host';
import type { LaneBinding, ReplicaLane } from '../replication/replica-lane';
import type { BlockDevice, ZeroOptions } from '../store/block-device';
import type { FileBlockDevice } from '../store/file-device';
import type {
  ReplicationConfig,
  ReplicationMode,
  Role,
  VolumeMetadata,
} from '../store/volume-metadata';
import type { Volume, VolumeStore } from '../store/volume-store';
import { ActivityLog } from '../tracking/activity-log';
import { DEFAULT_REGION_SIZE, DirtyBitmap, loadDirtyBitmap } from '../tracking/dirty-bitmap';
import { VolumeTracking, bitmapFile } from '../tracking/volume-tracking';
import { PeerOrder } from './peer-order';
import { RegionLocks } from './region-locks';

type ReadyVolume = Extract<Volume, { state: 'Ready' }>;

export interface ReplicationContext {
  node: string;
  /** This agent's address as peers should dial it. */
  address: string;
  store: VolumeStore;
  log: Logger;
  ackTimeoutMs: number;
}

export interface PeerStatus {
  address: string;
  node: string;
  state: PeerState;
  condition: string;
  dirtyBytes: number;
  resyncBytesSent: number;
  liveBytesSent: number;
  resync?: { kind: string; doneBytes: number; totalBytes: number; etaSeconds: number };
  lastInSyncAt: number;
}

export interface ReplicationStatus {
  role: Role;
  mode: ReplicationMode | '';
  regionSize: number;
  maxResyncBytesPerSecond: number;
  generation: string;
  /** Secondary: a primary is streaming to this copy right now. */
  primaryConnected: boolean;
  peers: PeerStatus[];
}

/** Runs `op` once the work queued with process.nextTick so far (the peers' batch) is done. */
function afterBatch(op: () => Promise<void>): Promise<void> {
  return new Promise((resolve, reject) => process.nextTick(() => op().then(resolve, reject)));
}

/**
 * Async mode bounds what is acknowledged locally but not yet by every peer, in writes and in
 * bytes: the bytes bound is the data a lost primary can take with it; the count bound keeps
 * tiny writes from piling up unbounded bookkeeping. Beyond either, writes wait for the peers.
 */
const ASYNC_MAX_BACKLOG = 512;
const ASYNC_MAX_BACKLOG_BYTES = 64 * 1024 * 1024;

export class ReplicatedVolume implements BlockDevice, PeerHost {
  readonly locks = new RegionLocks();
  private readonly peerOrder = new PeerOrder();
  tracking!: VolumeTracking;
  private links: PeerLink[] = [];
  private primaryLeft = false;
  private asyncBacklog = 0;
  private asyncBacklogBytes = 0;
  private inFlight = 0;
  private idle: (() => void)[] = [];
  private demoting = false;
  private metaWrite: Promise<void> = Promise.resolve();
  readonly log: Logger;
  /** Secondary: the session a primary opened with Handshake; its data lanes must present it. */
  session = '';
  /** Secondary: the primary that opened the session, and its data lanes by index. */
  private sessionPrimary = '';
  private readonly primaryLanes = new Map<number, ReplicaLane>();

  constructor(
    private readonly ctx: ReplicationContext,
    private readonly volume: ReadyVolume,
  ) {
    this.log = ctx.log.child({ volume: volume.name });
  }

  /** Starts replicating to the configured peers if this copy is a primary that has any. */
  async resume(): Promise<void> {
    if (this.meta.role === 'primary' && this.meta.replication?.peers.length)
      await this.startPeers();
  }

  // ---- identity (PeerHost) -------------------------------------------------------------------

  get meta(): VolumeMetadata {
    return this.volume.meta;
  }
  get local(): FileBlockDevice {
    return this.volume.device;
  }
  get volumeName(): string {
    return this.volume.name;
  }
  get uuid(): string {
    return this.meta.uuid;
  }
  get sizeBytes(): number {
    return this.meta.sizeBytes;
  }
  get size(): number {
    return this.meta.sizeBytes;
  }
  get regionSize(): number {
    return this.meta.replication?.regionSize ?? DEFAULT_REGION_SIZE;
  }
  get mode(): ReplicationMode {
    return this.meta.replication?.mode ?? 'sync';
  }
  get maxResyncBytesPerSecond(): number {
    return this.meta.replication?.maxResyncBytesPerSecond ?? 0;
  }
  get localNode(): string {
    return this.ctx.node;
  }
  get localAddress(): string {
    return this.ctx.address;
  }
  /** Only a primary takes writes; a secondary's export serves reads. */
  get readOnly(): boolean {
    return this.meta.readOnly || this.meta.role !== 'primary' || this.demoting;
  }
  generations(): Generations {
    return this.meta.generation;
  }
  peerOpsAhead(first: number, last: number): Promise<void> | undefined {
    return this.peerOrder.after(first, last);
  }
  bitmapUuid(peer: string): string | null {
    return this.meta.replication?.peers.find((p) => p.address === peer)?.bitmapUuid ?? null;
  }

  // ---- BlockDevice -------------------------------------------------------------------------

  read(offset: number, target: Buffer): Promise<void> {
    return this.local.read(offset, target);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    // Links may send the caller's buffer as is until the peer acknowledges it; async mode
    // answers before that, when the caller may reuse the buffer, so the peers get a copy.
    const shipped = this.mode === 'async' && this.links.length > 0 ? Buffer.from(data) : data;
    return this.replicate(
      offset,
      data.length,
      () => this.local.write(offset, data, fua),
      (l) => l.send(OpKind.WRITE, offset, data.length, shipped, fua ? OpFlag.FUA : 0),
    );
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.replicate(
      offset,
      length,
      () => this.local.writeZeroes(offset, length, opts),
      (l) => l.send(OpKind.ZERO, offset, length, undefined, opts.fua ? OpFlag.FUA : 0),
    );
  }

  trim(offset: number, length: number): Promise<void> {
    // Trim changes nothing on any copy (see FileBlockDevice), so nothing to replicate.
    return this.local.trim(offset, length);
  }

  async flush(): Promise<void> {
    // A FLUSH covers what its lane carried before it. Async writes travel on one lane ahead
    // of it; in any other mode, async writes still on their way must be answered first.
    const ahead = this.mode === 'async' ? undefined : this.peerOrder.all();
    if (ahead) await ahead;
    const legs: Promise<void>[] = [this.local.flush()];
    for (const l of this.links) {
      if (l.streaming) {
        legs.push(
          l
            .send(OpKind.FLUSH, 0, 0, undefined, 0)
            .catch((err: unknown) => this.flushMissed(l, err)),
        );
      } else if (this.mode === 'strict-sync') {
        legs.push(Promise.reject(this.strictRefusal(l)));
      }
    }
    const results = await Promise.allSettled(legs);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  // ---- the write path ----------------------------------------------------------------------

  private async replicate(
    offset: number,
    length: number,
    localOp: () => Promise<void>,
    peerOp: (l: PeerLink) => Promise<void>,
  ): Promise<void> {
    if (this.readOnly) {
      throw new LockstepError(
        'LOCKSTEP_ERR_READ_ONLY',
        `volume ${this.volumeName} is ${this.meta.role}; writes go to the primary`,
      );
    }
    const links = this.links;
    if (links.length === 0) return localOp();

    const rs = this.regionSize;
    const first = Math.floor(offset / rs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / rs);
    const locked = this.locks.acquire(first, last);
    if (locked) await locked;
    this.inFlight++;
    const al = this.tracking.activityLog;
    const unlock = () => this.locks.release(first, last);
    // The activity log keeps the regions until every copy has the write: a primary that dies
    // before then must resync them.
    const finished = () => {
      al.release(offset, length);
      if (--this.inFlight === 0) for (const wake of this.idle.splice(0)) wake();
    };
    try {
      const logged = al.ensure(offset, length);
      if (logged) await logged;
      if (this.mode === 'strict-sync') {
        const down = links.find((l) => !l.streaming);
        if (down) throw this.strictRefusal(down);
      }
    } catch (err) {
      unlock();
      finished();
      throw err;
    }

    // Async ops travel in order on one lane (see PeerLink.send): a later one may leave at once.
    const ahead = this.mode === 'async' ? undefined : this.peerOrder.after(first, last);
    let local: Promise<void>;
    let peers: Promise<void>[];
    if (ahead) {
      // An async write to these regions (made before the mode changed) is still on its way to
      // the peers: this op follows it.
      local = localOp();
      peers = [
        ahead.then(async () => {
          await Promise.all(this.toPeers(links, offset, length, peerOp));
        }),
      ];
    } else {
      // Peers first: their ops leave in this turn's batch (PeerLink flushes on
      // process.nextTick), and the local write is queued behind that flush, so the round trip to
      // the replica and its write overlap ours instead of following every local write of the
      // batch.
      peers = this.toPeers(links, offset, length, peerOp);
      local = peers.length > 0 ? afterBatch(localOp) : localOp();
    }
    const settled = Promise.allSettled([local, ...peers]);
    if (
      this.mode === 'async' &&
      this.asyncBacklog < ASYNC_MAX_BACKLOG &&
      this.asyncBacklogBytes + length <= ASYNC_MAX_BACKLOG_BYTES
    ) {
      // Acknowledged, and unlocked, once on the local copy; later writes to these regions reach
      // the peers after this one all the same (see PeerOrder).
      this.peerOrder.record(
        first,
        last,
        Promise.allSettled(peers).then(() => undefined),
      );
      this.asyncBacklog++;
      this.asyncBacklogBytes += length;
      void local.then(unlock, unlock);
      void settled.then(() => {
        this.asyncBacklog--;
        this.asyncBacklogBytes -= length;
        finished();
      });
      try {
        await local;
      } catch (err) {
        this.localFailed(offset, length);
        throw err;
      }
      return;
    }
    const results = await settled;
    unlock();
    finished();
    if (results[0].status === 'rejected') {
      this.localFailed(offset, length);
      throw results[0].reason;
    }
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** Sends one op to every peer; a peer that cannot take it has the range marked dirty. */
  private toPeers(
    links: readonly PeerLink[],
    offset: number,
    length: number,
    peerOp: (l: PeerLink) => Promise<void>,
  ): Promise<void>[] {
    const legs: Promise<void>[] = [];
    for (const l of links) {
      if (l.streaming)
        legs.push(peerOp(l).catch((err: unknown) => this.missed(l, offset, length, err)));
      else this.missed(l, offset, length);
    }
    return legs;
  }

  /**
   * The one place that decides what a peer's missed write means: it is recorded in the peer's
   * dirty bitmap (so resync sends it later) and, in strict-sync, fails the write.
   */
  private missed(link: PeerLink, offset: number, length: number, err?: unknown): void {
    this.tracking.markDirty(link.address, offset, length);
    this.startTracking(link.address);
    if (err !== undefined) link.fail(errorMessage(err));
    if (this.mode === 'strict-sync') throw this.strictRefusal(link);
  }

  private flushMissed(link: PeerLink, err: unknown): void {
    link.fail(errorMessage(err));
    if (this.mode === 'strict-sync') throw this.strictRefusal(link);
  }

  private strictRefusal(link: PeerLink): LockstepError {
    return new LockstepError(
      'LOCKSTEP_ERR_IO',
      `strict-sync: peer ${link.address} is ${link.state}, so the write is refused rather than acknowledged on fewer copies`,
    );
  }

  /** The local write failed: the peers may hold data we do not; resync makes them ours again. */
  private localFailed(offset: number, length: number): void {
    for (const l of this.links) {
      this.tracking.markDirty(l.address, offset, length);
      this.startTracking(l.address);
      l.resyncInPlace();
    }
  }

  /**
   * A peer just started missing writes. DRBD's rule: remember the generation it still has (its
   * bitmap UUID) and move this copy to a new one, so copies that diverge can be told apart.
   */
  private startTracking(peer: string): void {
    const repl = this.meta.replication!;
    const cfg = repl.peers.find((p) => p.address === peer);
    if (!cfg || cfg.bitmapUuid !== null) return;
    const generation = advance(this.meta.generation, randomUUID());
    const peers = repl.peers.map((p) =>
      p.address === peer ? { ...p, bitmapUuid: this.meta.generation.current } : p,
    );
    void this.saveMeta({ ...this.meta, generation, replication: { ...repl, peers } }).catch(
      () => undefined,
    );
    this.log.info({ peer, generation: generation.current }, 'peer missed writes: new generation');
    for (const l of this.links) {
      if (l.address !== peer && l.state === 'InSync')
        void l.pushGeneration().catch(() => undefined);
    }
  }

  private saveMeta(meta: VolumeMetadata): Promise<void> {
    this.volume.meta = meta;
    // Metadata writes are applied in order; each writes the latest state.
    this.metaWrite = this.metaWrite
      .catch(() => undefined)
      .then(() => this.ctx.store.updateMeta(this.volumeName, this.volume.meta))
      .catch((err: unknown) => {
        this.log.error({ err: errorMessage(err) }, 'volume metadata could not be saved');
        throw err;
      });
    return this.metaWrite;
  }

  // ---- PeerHost callbacks -------------------------------------------------------------------

  async onPeerCaughtUp(link: PeerLink): Promise<void> {
    const repl = this.meta.replication!;
    const peers = repl.peers.map((p) =>
      p.address === link.address ? { ...p, node: link.node, bitmapUuid: null } : p,
    );
    await this.saveMeta({ ...this.meta, replication: { ...repl, peers } });
  }

  onPeerState(link: PeerLink, from: PeerState, to: PeerState): void {
    this.log.info(
      { peer: link.address, from, to, condition: link.condition || undefined },
      'peer state',
    );
  }

  // ---- roles and configuration -------------------------------------------------------------

  private async startPeers(): Promise<void> {
    const repl = this.meta.replication;
    if (!repl || repl.peers.length === 0) return;
    this.tracking = await VolumeTracking.open({
      dir: this.volume.dir,
      volumeUuid: this.uuid,
      volumeSize: this.sizeBytes,
      regionSize: repl.regionSize,
      peers: repl.peers.map((p) => p.address),
      peersBehind: repl.peers.filter((p) => p.bitmapUuid !== null).map((p) => p.address),
      log: this.log,
    });
    this.links = repl.peers.map(
      (p) => new PeerLink(p.address, this, { ackTimeoutMs: this.ctx.ackTimeoutMs }),
    );
    for (const l of this.links) l.start();
  }

  /** Waits until no write is between its lock and its last leg. */
  private drainWrites(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /** Stops the links; those in `announceTo` ('all', or addresses) hear that we are leaving. */
  private async stopPeers(announceTo: 'all' | readonly string[]): Promise<void> {
    const links = this.links;
    this.links = [];
    const told = links.filter(
      (l) => l.streaming && (announceTo === 'all' || announceTo.includes(l.address)),
    );
    await Promise.allSettled(told.map((l) => l.announceLeaving()));
    for (const l of links) l.stop();
    if (links.length > 0) await this.tracking.close();
  }

  /**
   * Makes this primary replicate to `targets`: added to the peers it already has or, with
   * `replace`, exactly these (a dropped peer's bitmap goes with it).
   */
  async configure(
    targets: string[],
    mode: ReplicationMode,
    regionSize: number,
    maxResyncBytesPerSecond: number,
    replace = false,
  ): Promise<void> {
    if (this.meta.role !== 'primary') {
      throw new LockstepError(
        'LOCKSTEP_ERR_READ_ONLY',
        `volume ${this.volumeName} is a secondary; run replicate on its primary`,
      );
    }
    const current = this.meta.replication;
    if (current && current.regionSize !== regionSize && current.peers.length > 0) {
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `volume ${this.volumeName} already replicates with ${current.regionSize}-byte regions; the region size cannot change`,
      );
    }
    new DirtyBitmap(this.sizeBytes, regionSize); // throws a clear error for a bad region size
    const kept = (current?.peers ?? []).filter((p) => !replace || targets.includes(p.address));
    const dropped = (current?.peers ?? []).filter((p) => !kept.includes(p));
    const peers = [...kept];
    for (const t of targets) {
      if (t === this.localAddress) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `${t} is this agent; replicate to another agent`,
        );
      }
      if (!peers.some((p) => p.address === t))
        peers.push({ address: t, node: '', bitmapUuid: null });
    }
    await this.reconfigure(
      peers.length > 0 ? { mode, regionSize, maxResyncBytesPerSecond, peers } : null,
      dropped.map((p) => p.address),
    );
  }

  /** Stops replicating: the peers are told, their tracking is dropped, the copy stands alone. */
  async stopReplication(): Promise<void> {
    const repl = this.meta.replication;
    if (this.meta.role !== 'primary' || !repl) return;
    await this.reconfigure(
      null,
      repl.peers.map((p) => p.address),
    );
    this.log.info('replication stopped');
  }

  private async reconfigure(
    replication: ReplicationConfig | null,
    dropped: string[],
  ): Promise<void> {
    await this.drainWrites();
    await this.stopPeers(dropped);
    await this.saveMeta({ ...this.meta, replication });
    for (const peer of dropped) await rm(bitmapFile(this.volume.dir, peer), { force: true });
    if (!replication) await rm(path.join(this.volume.dir, 'activity.log'), { force: true });
    await this.startPeers();
  }

  async promote(force: boolean): Promise<void> {
    if (this.meta.role === 'primary') return;
    if (this.meta.generation.current === ZERO_GENERATION && !force) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} has never completed its first sync; promoting it would serve incomplete data (use --force to accept that)`,
      );
    }
    if (this.primaryLanes.size > 0 && !this.primaryLeft && !force) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `a primary is replicating volume ${this.volumeName} to this copy; demote it first, or use --force if it is gone`,
      );
    }
    const repl = this.meta.replication;
    // From now on the old primary (and any other peer) misses our writes until it resyncs.
    const peers = (repl?.peers ?? []).map((p) => ({
      ...p,
      bitmapUuid: this.meta.generation.current,
    }));
    const generation = advance(this.meta.generation, randomUUID());
    await this.saveMeta({
      ...this.meta,
      role: 'primary',
      generation,
      replication: repl ? { ...repl, peers } : null,
    });
    this.primaryLeft = false;
    this.endSession('promoted to primary: it takes no more replicated writes');
    this.log.info({ force, generation: generation.current }, 'promoted to primary');
    if (peers.length > 0) await this.startPeers();
  }

  async demote(): Promise<void> {
    if (this.meta.role === 'secondary') return;
    this.demoting = true;
    try {
      await this.drainWrites();
      await this.flush().catch((err: unknown) =>
        this.log.warn({ err: errorMessage(err) }, 'flush before demotion failed'),
      );
      await this.stopPeers('all');
      await this.saveMeta({ ...this.meta, role: 'secondary' });
    } finally {
      this.demoting = false;
    }
    this.log.info('demoted to secondary');
  }

  discardPeer(peer: string): void {
    const link = this.links.find((l) => l.address === peer);
    if (!link) {
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `${peer} is not a peer of volume ${this.volumeName} here (run this on the primary; peers are listed by status)`,
      );
    }
    this.log.warn({ peer }, 'operator asked to discard the peer’s diverging writes');
    link.discardPeer();
  }

  // ---- the secondary side ------------------------------------------------------------------

  /** Answers a primary's handshake; returns this copy's view for its decision. */
  async acceptPrimary(primary: {
    address: string;
    node: string;
    mode: ReplicationMode;
    regionSize: number;
  }): Promise<{ differs: Buffer }> {
    if (this.meta.role === 'secondary') {
      if (
        this.primaryLanes.size > 0 &&
        this.sessionPrimary !== primary.address &&
        !this.primaryLeft
      ) {
        throw new LockstepError(
          'LOCKSTEP_ERR_NOT_ALLOWED',
          `volume ${this.volumeName} is being replicated from ${this.sessionPrimary}; a second primary (${primary.address}) is refused: demote one of them`,
        );
      }
      const repl = this.meta.replication;
      const known = repl?.peers.length === 1 && repl.peers[0].address === primary.address;
      if (!known || repl.mode !== primary.mode || repl.regionSize !== primary.regionSize) {
        await this.saveMeta({
          ...this.meta,
          replication: {
            mode: primary.mode,
            regionSize: primary.regionSize,
            maxResyncBytesPerSecond: repl?.maxResyncBytesPerSecond ?? 0,
            peers: [{ address: primary.address, node: primary.node, bitmapUuid: null }],
          },
        });
      }
      this.endSession('a new handshake replaced the session');
      this.session = randomBytes(TOKEN_BYTES).toString('hex');
      this.sessionPrimary = primary.address;
      this.primaryLeft = false;
    }
    return { differs: await this.differs(primary.regionSize) };
  }

  /**
   * Regions where this copy may hold data a new primary lacks: what it wrote as a primary that
   * its peers never acknowledged (its saved bitmaps) and what was in flight when it last
   * crashed as a primary (its activity log).
   */
  private async differs(regionSize: number): Promise<Buffer> {
    const out = new DirtyBitmap(this.sizeBytes, regionSize);
    const files = await readdir(this.volume.dir).catch(() => [] as string[]);
    for (const f of files.filter((n) => n.startsWith('bitmap-'))) {
      try {
        const { bitmap } = await loadDirtyBitmap(path.join(this.volume.dir, f), {
          volumeUuid: this.uuid,
          volumeSize: this.sizeBytes,
          regionSize,
        });
        out.merge(bitmap);
      } catch {
        out.setAll();
      }
    }
    const recovered = await ActivityLog.recover(path.join(this.volume.dir, 'activity.log'), {
      volumeUuid: this.uuid,
      volumeSize: this.sizeBytes,
      beforeEvict: () => Promise.resolve(),
    });
    if (recovered === 'all') out.setAll();
    else for (const r of recovered) out.markRange(r.offset, r.length);
    return out.dirtyRegions > 0 ? out.toBuffer() : Buffer.alloc(0);
  }

  /** The primary says this copy now holds everything up to `gen`. */
  async adoptGeneration(gen: Generations): Promise<void> {
    if (this.meta.role !== 'secondary') {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} is a primary here`,
      );
    }
    // The data this generation vouches for must be on disk before the claim is: otherwise a
    // power loss could leave a copy that says it is in sync and is not (it would never resync).
    await this.local.flush();
    await this.saveMeta({
      ...this.meta,
      generation: { current: gen.current, history: gen.history },
    });
    // Whatever this copy tracked as a former primary is now superseded by the new primary's data.
    for (const f of await readdir(this.volume.dir)) {
      if (f.startsWith('bitmap-') || f === 'activity.log')
        await rm(path.join(this.volume.dir, f), { force: true });
    }
  }

  /** Binds a data lane that presented `token` as lane `index`; throws why not. */
  attachLane(token: string, index: number, lane: ReplicaLane): LaneBinding {
    if (this.meta.role !== 'secondary') {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} is a primary here; it takes no replicated writes`,
      );
    }
    if (!this.session || token !== this.session) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `stale or unknown session token for volume ${this.volumeName} (a newer handshake replaced it, or there was none): handshake again`,
      );
    }
    if (this.primaryLanes.has(index)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `lane ${index} of volume ${this.volumeName}'s session is already connected`,
      );
    }
    this.primaryLanes.set(index, lane);
    return {
      device: this.local,
      detach: () => {
        if (this.primaryLanes.get(index) === lane) this.primaryLanes.delete(index);
      },
    };
  }

  /** Closes the current session's lanes: its token is no longer accepted. */
  private endSession(reason: string): void {
    this.session = '';
    this.sessionPrimary = '';
    const lanes = [...this.primaryLanes.values()];
    this.primaryLanes.clear();
    for (const lane of lanes) lane.close(reason);
  }
  primaryLeaving(): void {
    this.primaryLeft = true;
  }

  // ---- status and shutdown -----------------------------------------------------------------

  status(): ReplicationStatus {
    return {
      role: this.meta.role,
      mode: this.meta.replication?.mode ?? '',
      regionSize: this.regionSize,
      maxResyncBytesPerSecond: this.maxResyncBytesPerSecond,
      generation: this.meta.generation.current,
      primaryConnected: this.meta.role === 'secondary' && this.primaryLanes.size > 0,
      peers: this.links.map((l) => {
        const dirtyBytes = this.tracking.bitmap(l.address).dirtyBytes();
        let resync: PeerStatus['resync'];
        if (l.resync) {
          const elapsed = (Date.now() - l.resync.startedAt) / 1000;
          const rate = elapsed > 0 ? l.resync.doneBytes / elapsed : 0;
          const left = Math.max(0, l.resync.totalBytes - l.resync.doneBytes);
          resync = {
            kind: l.resync.kind,
            doneBytes: l.resync.doneBytes,
            totalBytes: l.resync.totalBytes,
            etaSeconds: rate > 0 ? Math.ceil(left / rate) : -1,
          };
        }
        return {
          address: l.address,
          node: l.node,
          state: l.state,
          condition: l.condition,
          dirtyBytes,
          resyncBytesSent: l.resyncBytesSent,
          liveBytesSent: l.liveBytesSent,
          resync,
          lastInSyncAt: l.lastInSyncAt,
        };
      }),
    };
  }

  /** Agent shutdown: writes drained, bitmaps saved, activity log marked clean. */
  async close(): Promise<void> {
    this.endSession('volume closing');
    await this.drainWrites();
    await this.stopPeers([]);
    await this.metaWrite.catch(() => undefined);
  }
}
