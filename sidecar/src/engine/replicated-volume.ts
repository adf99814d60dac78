// One volume's replication engine: the BlockDevice the NBD frontend serves, whatever this copy
// is, and the role and configuration transitions between what it can be.
//
//   primary, alone          writes go to the local copy
//   primary, replicating    writes go through the splitter (splitter.ts) to the local copy and
//                           every peer link; the peers' tracking lives as long as the links
//   secondary               the local copy takes a primary's replicated writes through its
//                           session (replication/secondary-session.ts); the export is read-only
//
// Transitions (configure, stop, promote, demote) hold new writes until they are done and wait
// for the writes in flight, so no write is ever made under one configuration and tracked
// under another.
import type { Transport } from '../../../lib/tls/transport';
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { LockstepError, isLockstepError } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { advance, ZERO_GENERATION, type Generations } from '../replication/generations';
import { dropEstablishment, type CutoverPolicy } from '../replication/establishment';
import { PeerLink } from '../replication/peer-link';
import type { PeerHost } from '../replication/peer-host';
import type { LaneBinding, ReplicaLane } from '../replication/replica-lane';
import type { ReplicaVolume } from '../replication/replica-service';
import {
  STREAMING_STATES,
  type PeerState,
  type ProtectionStatus,
  type ReplicationStatus,
} from '../replication/replication-status';
import { SecondarySession, type PrimaryHello } from '../replication/secondary-session';
import { SendBatch } from '../replication/send-batch';
import type { BlockDevice, MetaContexts, ZeroOptions } from '../block-device';
import type { FileBlockDevice } from '../store/file-device';
import { resyncProtection } from '../snapshots/resync-protection';
import type { SnapshotCatalog } from '../snapshots/snapshot-catalog';
import { MetaWriter, type ReadyVolume } from '../store/meta-writer';
import type {
  MediatorConfig,
  ReplicationConfig,
  ReplicationMode,
  Role,
  VolumeMetadata,
} from '../store/volume-metadata';
import type { VolumeStore } from '../store/volume-store';
import { DEFAULT_REGION_SIZE, DirtyBitmap } from '../tracking/dirty-bitmap';
import { regionsHeldAlone } from '../tracking/former-primary';
import { VolumeTracking, bitmapFile, startTracking } from '../tracking/volume-tracking';
import { EpochAuthority, type Standing } from './epoch-authority';
import { FailoverWatch, claimEpoch, type WatchState } from './failover';
import { policyFor } from './mode-policy';
import { Splitter, type WriteLeg } from './splitter';
import { replicationStatus } from './status-view';

function standingDetail(s: Standing, unreachable: string): string {
  switch (s.kind) {
    case 'unprotected':
      return 'no mediator: split brain protection is off (a lost primary needs promote --force)';
    case 'confirming':
      return `reading the mediator's record before acknowledging writes${unreachable ? `: ${unreachable}` : ''}`;
    case 'holding':
      return '';
    case 'seeking':
      return `writes a lost peer missed wait for a new epoch since ${new Date(s.since).toISOString()}: ${s.why}`;
    case 'fenced':
      return s.reason;
  }
}

function watchDetail(w: WatchState, graceMs: number): string {
  switch (w.kind) {
    case 'primary-present':
      return '';
    case 'waiting':
      return `no primary since ${new Date(w.since).toISOString()}; takes over after ${graceMs} ms (primary was ${w.record.primary}, epoch ${w.record.epoch})`;
    case 'not-eligible':
    case 'mediator-unreachable':
      return w.why;
    case 'took-over':
      return `promoted in epoch ${w.epoch}`;
  }
}

export interface ReplicationContext {
  node: string;
  /** This agent's address as peers should dial it. */
  address: string;
  store: VolumeStore;
  log: Logger;
  ackTimeoutMs: number;
  cutover: CutoverPolicy;
  /** How this agent's connections to peers and the mediator are secured. */
  transport: Transport;
  /** How to reach one peer: `transport`, or credentials of the peer's own cluster. */
  peerTransport(address: string): Transport;
  /** Promotes a volume in an epoch its automatic failover was granted (the agent's promote). */
  takeOver(volume: string, epoch: number): Promise<void>;
  /**
   * A volume's copy stopped being the primary (fenced, or demoted): its NBD clients are cut,
   * to reconnect to the new primary.
   */
  primaryGone(volume: string): void;
  /** Where a volume's sampled write legs are timed (the agent's metrics). */
  observeLeg(volume: string): (leg: WriteLeg, seconds: number) => void;
}

/** A primary's peers and what exists only while it has them. */
interface Replicating {
  tracking: VolumeTracking;
  links: PeerLink[];
  splitter: Splitter;
  /** Its standing at the mediator (split brain protection). */
  authority: EpochAuthority;
}

/** What this copy is now. */
type Phase =
  | { role: 'primary'; replicating: Replicating | undefined; demoting: boolean }
  | { role: 'secondary'; session: SecondarySession };

/** How long a move's new primary holds its first writes for its replicas to start streaming. */
const PEERS_STREAMING_WAIT_MS = 2_000;

export class ReplicatedVolume implements BlockDevice, PeerHost, ReplicaVolume {
  readonly log: Logger;
  private readonly record: MetaWriter;
  private readonly batch = new SendBatch();
  private phase: Phase;
  /** Set while a transition runs: writes wait for it. */
  private transition: Promise<void> | undefined;
  /** Set while a group cut without hold runs: writes run, their answers wait for it. */
  private ackGate: Promise<void> | undefined;
  /** Writes sent straight to the local copy (no peers) and not finished. */
  private directWrites = 0;
  private directIdle: (() => void)[] = [];
  /** A secondary's automatic failover, while its relationship has one. */
  private watch: { config: string; watch: FailoverWatch } | undefined;
  /** A promotion under way: later callers wait for it instead of making their own. */
  private promoting: Promise<void> | undefined;
  /** Why this copy stopped being a primary on its own (fenced), for status. */
  fencedReason = '';
  /** Settles when the last fencing's demotion has. */
  private fencing: Promise<void> = Promise.resolve();
  private readonly directDone = () => {
    if (--this.directWrites === 0) for (const wake of this.directIdle.splice(0)) wake();
  };

  constructor(
    private readonly ctx: ReplicationContext,
    private readonly volume: ReadyVolume,
  ) {
    this.log = ctx.log.child({ volume: volume.name });
    this.record = new MetaWriter(volume, ctx.store, this.log);
    this.phase =
      volume.meta.role === 'primary'
        ? { role: 'primary', replicating: undefined, demoting: false }
        : { role: 'secondary', session: this.newSession() };
  }

  /** Starts replicating to the configured peers if this copy is a primary that has any. */
  async resume(): Promise<void> {
    if (this.phase.role === 'primary') await this.startPeers();
    else this.syncWatch();
  }

  // ---- identity ------------------------------------------------------------------------------

  get meta(): VolumeMetadata {
    return this.record.meta;
  }
  get local(): FileBlockDevice {
    return this.volume.device;
  }
  get dir(): string {
    return this.volume.dir;
  }
  get snapshots(): SnapshotCatalog {
    return this.volume.snapshots;
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
  get role(): Role {
    return this.phase.role;
  }
  get generation(): Generations {
    return this.meta.generation;
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
  /** The newest epoch this copy has seen; a primary's is the one its writes carry. */
  get epoch(): number {
    return this.meta.epoch ?? 0;
  }
  /** The node this copy replicates from, while it is a secondary (as its primary's certificate named it). */
  get primaryNode(): string | undefined {
    return this.phase.role === 'secondary'
      ? this.meta.replication?.peers[0]?.node || undefined
      : undefined;
  }
  get peerNodes(): readonly string[] {
    if (this.phase.role !== 'primary') return [];
    const named = (this.meta.replication?.peers ?? []).map((p) => p.node);
    const live = (this.phase.replicating?.links ?? []).map((l) => l.node);
    return [...new Set([...named, ...live].filter((n) => n !== ''))];
  }
  /** A secondary's list of the relationship's nodes, as its primary last told it. */
  get listedNodes(): readonly string[] {
    return this.meta.members ?? [];
  }
  relationshipNodes(): string[] {
    return [...new Set([this.localNode, ...this.peerNodes])];
  }
  get mediator(): MediatorConfig | undefined {
    return this.meta.replication?.mediator;
  }
  /** This copy's name in the mediator's records: as its primary dials it, or its own address. */
  identity(): string {
    return this.meta.replication?.self ?? this.ctx.address;
  }
  /** Only a primary takes writes; a secondary's export serves reads. */
  get readOnly(): boolean {
    const p = this.phase;
    return this.meta.readOnly || p.role !== 'primary' || p.demoting;
  }

  /** Stepping down: a write belongs on the next primary, not refused for good. */
  get leaving(): boolean {
    const p = this.phase;
    return p.role === 'primary' && p.demoting;
  }

  // ---- BlockDevice ---------------------------------------------------------------------------

  read(offset: number, target: Buffer): Promise<void> {
    return this.local.read(offset, target);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.transition) return this.transition.then(() => this.write(offset, data, fua));
    if (this.readOnly) return Promise.reject(this.readOnlyError());
    const splitter = this.splitter();
    const done = splitter
      ? splitter.write(offset, data, fua)
      : this.direct(() => this.local.write(offset, data, fua));
    return this.ackGate ? this.gated(done, this.ackGate) : done;
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    if (this.transition) return this.transition.then(() => this.writeZeroes(offset, length, opts));
    if (this.readOnly) return Promise.reject(this.readOnlyError());
    const splitter = this.splitter();
    const done = splitter
      ? splitter.writeZeroes(offset, length, opts)
      : this.direct(() => this.local.writeZeroes(offset, length, opts));
    return this.ackGate ? this.gated(done, this.ackGate) : done;
  }

  /** A write's answer, held until the gate opens (it still runs meanwhile). */
  private gated(done: Promise<void>, gate: Promise<void>): Promise<void> {
    return done.then(
      () => gate,
      (err: unknown) => gate.then(() => Promise.reject(err as Error)),
    );
  }

  trim(offset: number, length: number): Promise<void> {
    // Trim changes nothing on any copy (see FileBlockDevice), so nothing to replicate.
    return this.local.trim(offset, length);
  }

  flush(): Promise<void> {
    return (this.splitter() ?? this.local).flush();
  }

  /** Reads come from the local copy, so its status (allocation) is the export's. */
  get metaContexts(): MetaContexts {
    return this.local.metaContexts;
  }

  /** The splitter if this copy is a primary that replicates. */
  private splitter(): Splitter | undefined {
    return this.phase.role === 'primary' ? this.phase.replicating?.splitter : undefined;
  }

  private readOnlyError(): LockstepError {
    return new LockstepError(
      'LOCKSTEP_ERR_READ_ONLY',
      `volume ${this.volumeName} is ${this.meta.role}; writes go to the primary`,
    );
  }

  private direct(op: () => Promise<void>): Promise<void> {
    this.directWrites++;
    return op().finally(this.directDone);
  }

  /** Waits until no write is on its way to any copy. */
  private async drainWrites(): Promise<void> {
    if (this.directWrites > 0) await new Promise<void>((resolve) => this.directIdle.push(resolve));
    await this.splitter()?.drain();
  }

  // ---- write-order points (snapshots) --------------------------------------------------------

  /**
   * Holds new writes and waits for the ones in flight (on every copy); resolves with the
   * release. A snapshot cut meanwhile holds exactly the writes acknowledged before it, on this
   * copy and on peers told to cut too.
   */
  async holdWrites(): Promise<() => void> {
    while (this.transition) await this.transition.catch(() => undefined);
    let release!: () => void;
    this.transition = new Promise((resolve) => (release = resolve));
    const done = () => {
      this.transition = undefined;
      release();
    };
    try {
      await this.drainWrites();
    } catch (err) {
      done();
      throw err;
    }
    return done;
  }

  /**
   * Lets writes run but holds back their answers until the release: what "drain without hold"
   * needs, so that no write after a group's cut is acknowledged before every member has cut.
   */
  gateAcks(): () => void {
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    this.ackGate = gate;
    return () => {
      if (this.ackGate === gate) this.ackGate = undefined;
      open();
    };
  }

  /** Waits until no write is on its way (new ones are not held). */
  drained(): Promise<void> {
    return this.drainWrites();
  }

  /**
   * The peers that can cut at this copy's point (in sync, streaming), and those that cannot,
   * with why: they lack the snapshot, and say so.
   */
  snapshotPeers(): { ready: PeerLink[]; lacking: { link: PeerLink; reason: string }[] } {
    const links = this.phase.role === 'primary' ? (this.phase.replicating?.links ?? []) : [];
    const ready = links.filter((l) => l.state === 'InSync' && l.streaming);
    const lacking = links
      .filter((l) => !ready.includes(l))
      .map((link) => ({
        link,
        reason: `peer is ${link.state}${link.reason ? `: ${link.reason}` : ''}`,
      }));
    return { ready, lacking };
  }

  /** Every peer link of a replicating primary, whatever its state. */
  peerLinks(): readonly PeerLink[] {
    return this.phase.role === 'primary' ? (this.phase.replicating?.links ?? []) : [];
  }

  /** Runs a transition alone: new writes wait for it, and it waits for the writes in flight. */
  private async transit(work: () => Promise<void>): Promise<void> {
    while (this.transition) await this.transition.catch(() => undefined);
    const run = (async () => {
      await this.drainWrites();
      await work();
    })();
    this.transition = run.then(
      () => undefined,
      () => undefined,
    );
    try {
      await run;
    } finally {
      this.transition = undefined;
    }
  }

  // ---- PeerHost ------------------------------------------------------------------------------

  generations(): Generations {
    return this.meta.generation;
  }
  bitmapUuid(peer: string): string | null {
    return this.meta.replication?.peers.find((p) => p.address === peer)?.bitmapUuid ?? null;
  }
  get tracking(): VolumeTracking {
    return this.replicating().tracking;
  }
  withRegionsLocked<T>(first: number, last: number, work: () => Promise<T>): Promise<T> {
    return this.replicating().splitter.withRegionsLocked(first, last, work);
  }

  async onPeerCaughtUp(link: PeerLink): Promise<void> {
    const own = this.replicating();
    const repl = this.meta.replication!;
    const peers = repl.peers.map((p) =>
      p.address === link.address ? { ...p, node: link.node, bitmapUuid: null } : p,
    );
    await this.record.save({ ...this.meta, replication: { ...repl, peers } });
    this.announceMembers();
    // In sync only once the mediator counts it so: from then on, a write it misses waits.
    await own.authority.include(link.address);
  }

  onPeerState(link: PeerLink, from: PeerState, to: PeerState): void {
    this.log.info({ peer: link.address, from, to, reason: link.reason || undefined }, 'peer state');
    const p = this.phase;
    if (p.role === 'primary' && !STREAMING_STATES.has(to) && p.replicating?.links.includes(link))
      p.replicating.authority.lost(link.address);
  }

  /** A peer has seen a newer epoch than ours (ESTALE, or a refused handshake): we were replaced. */
  replaced(reason: string): void {
    const p = this.phase;
    if (p.role !== 'primary') return;
    if (p.replicating) p.replicating.authority.fence(reason);
    else this.fence(reason);
  }

  // ---- epochs --------------------------------------------------------------------------------

  /** Keeps the newest epoch seen, durably, before anything acts on it. */
  private async saveEpoch(epoch: number): Promise<void> {
    if (epoch <= this.epoch) return;
    await this.record.save({ ...this.meta, epoch });
  }

  /**
   * Another copy holds a newer epoch: stop being a primary. Writes waiting or arriving fail
   * (the authority refuses them); the peers are not told we step down, since we do not: we
   * were replaced.
   */
  private fence(reason: string): void {
    const p = this.phase;
    if (p.role !== 'primary' || this.fencedReason) return;
    this.fencedReason = reason;
    this.phase = { ...p, demoting: true };
    this.ctx.primaryGone(this.volumeName);
    this.fencing = this.transit(async () => {
      const members = this.relationshipNodes();
      await this.stopPeers([]);
      await this.record.save({ ...this.meta, role: 'secondary', members });
      this.phase = { role: 'secondary', session: this.newSession() };
      this.syncWatch();
    })
      .then(() => this.log.warn({ reason }, 'fenced: demoted to secondary'))
      .catch((err: unknown) => this.log.error({ err: String(err) }, 'fencing failed'));
  }

  /** Where this copy stands with the mediator: a primary's authority, a secondary's watch. */
  private protection(): ProtectionStatus {
    const p = this.phase;
    const m = this.meta.replication?.mediator;
    const base = {
      mediator: m?.address ?? '',
      group: m?.group ?? '',
      failover: m?.failover ?? '',
      epoch: this.epoch,
      inSync: [] as string[],
      primaryAbsentMs: p.role === 'secondary' ? p.session.primaryAbsentMs() : 0,
      graceMs: m?.graceMs ?? 0,
      suspendLimitMs: m?.suspendLimitMs ?? 0,
      forcedPromotionAtMs: this.meta.forcedPromotionAtMs ?? 0,
      mediatorReachable: true,
    };
    if (p.role === 'primary') {
      const authority = p.replicating?.authority;
      const standing: Standing = authority?.standing ?? { kind: 'unprotected' };
      return {
        ...base,
        inSync: authority?.inSync ?? [],
        acceptsWrites:
          !this.readOnly && (standing.kind === 'holding' || standing.kind === 'unprotected'),
        state: standing.kind,
        mediatorReachable: !authority?.unreachable,
        detail: standingDetail(standing, authority?.unreachable ?? ''),
      };
    }
    if (this.fencedReason)
      return { ...base, acceptsWrites: false, state: 'fenced', detail: this.fencedReason };
    if (!m) return { ...base, acceptsWrites: false, state: 'unprotected', detail: '' };
    if (m.failover === 'manual')
      return {
        ...base,
        acceptsWrites: false,
        state: 'manual',
        detail:
          'failover is manual: `lockstep ctl failover` promotes this copy through the mediator',
      };
    const w: WatchState = this.watch?.watch.state ?? { kind: 'primary-present' };
    return {
      ...base,
      acceptsWrites: false,
      state: w.kind,
      mediatorReachable: w.kind !== 'mediator-unreachable',
      detail: watchDetail(w, m.graceMs),
    };
  }

  /** Runs the automatic failover watch exactly while this secondary's relationship asks for it. */
  private syncWatch(): void {
    const mediator = this.meta.replication?.mediator;
    const wanted =
      this.phase.role === 'secondary' && mediator?.failover === 'automatic'
        ? JSON.stringify(mediator)
        : undefined;
    if (this.watch?.config === wanted) return;
    this.watch?.watch.stop();
    this.watch = undefined;
    if (!wanted || !mediator) return;
    const watch = new FailoverWatch(
      {
        log: this.log,
        transport: this.ctx.transport,
        identity: () => this.identity(),
        epoch: () => this.epoch,
        primaryPresent: () => {
          const now = this.phase;
          return (
            now.role !== 'secondary' || now.session.primaryActive || now.session.primaryLeftCleanly
          );
        },
        takeOver: (epoch, reason) =>
          this.ctx.takeOver(this.volumeName, epoch).then(
            () => this.log.warn({ epoch, reason }, 'promoted by automatic failover'),
            (err: unknown) =>
              this.log.error({ err: String(err), epoch }, 'automatic failover could not promote'),
          ),
      },
      mediator,
    );
    this.watch = { config: wanted, watch };
  }

  private replicating(): Replicating {
    const p = this.phase;
    if (p.role !== 'primary' || !p.replicating) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} has no peers here`,
      );
    }
    return p.replicating;
  }

  // ---- a primary's peers ---------------------------------------------------------------------

  /**
   * A peer missed [offset, +length): its bitmap records it and, the first time, DRBD's rule
   * applies: remember the generation it still has (its bitmap UUID) and move this copy to a new
   * one, so copies that diverge can be told apart. With a mediator the new generation waits for
   * the new epoch that drops the peer (peersDropped): until then no write it missed is
   * acknowledged, and a primary fenced meanwhile keeps the generation its successor knows.
   */
  private peerMissed(own: Replicating, peer: string, offset: number, length: number): void {
    own.tracking.markDirty(peer, offset, length);
    own.links.find((l) => l.address === peer)?.missedWrites();
    if (!this.meta.replication?.mediator) this.newGenerationWithout(own, [peer]);
  }

  /** The mediator granted an epoch without these peers: from now on they fall behind. */
  private peersDropped(own: Replicating, peers: string[]): void {
    this.newGenerationWithout(own, peers);
  }

  private newGenerationWithout(own: Replicating, dropped: string[]): void {
    const repl = this.meta.replication!;
    const fresh = dropped.filter(
      (peer) => repl.peers.find((p) => p.address === peer)?.bitmapUuid === null,
    );
    if (fresh.length === 0) return;
    const generation = advance(this.meta.generation, randomUUID());
    const peers = repl.peers.map((p) =>
      fresh.includes(p.address) ? { ...p, bitmapUuid: this.meta.generation.current } : p,
    );
    void this.record
      .save({ ...this.meta, generation, replication: { ...repl, peers } })
      .catch(() => undefined);
    this.log.info(
      { peers: fresh, generation: generation.current },
      'peers fell behind: new generation',
    );
    for (const l of own.links) {
      if (!fresh.includes(l.address) && l.state === 'InSync')
        void l.pushGeneration().catch(() => undefined);
    }
  }

  private async startPeers(): Promise<void> {
    const repl = this.meta.replication;
    if (this.phase.role !== 'primary' || !repl || repl.peers.length === 0) return;
    const tracking = await VolumeTracking.open({
      dir: this.volume.dir,
      volumeUuid: this.uuid,
      volumeSize: this.sizeBytes,
      regionSize: repl.regionSize,
      peers: repl.peers.map((p) => p.address),
      peersBehind: repl.peers.filter((p) => p.bitmapUuid !== null).map((p) => p.address),
      log: this.log,
    });
    const links = repl.peers.map(
      (p) =>
        new PeerLink(p.address, this, {
          transport: () => this.ctx.peerTransport(p.address),
          ackTimeoutMs: this.ctx.ackTimeoutMs,
          batch: this.batch,
          cutover: this.ctx.cutover,
        }),
    );
    const authority = new EpochAuthority(
      {
        log: this.log,
        transport: this.ctx.transport,
        volumeName: this.volumeName,
        identity: () => this.identity(),
        epoch: () => this.epoch,
        saveEpoch: (epoch) => this.saveEpoch(epoch),
        fence: (reason) => this.fence(reason),
        peersDropped: (peers) => this.peersDropped(replicating, peers),
      },
      repl.mediator,
      repl.mode === 'strict-sync',
    );
    const replicating: Replicating = {
      tracking,
      links,
      authority,
      splitter: new Splitter({
        local: this.local,
        peers: links,
        policy: policyFor(repl.mode),
        authority,
        regionSize: repl.regionSize,
        batch: this.batch,
        activity: tracking.activityLog,
        // These links' misses go to these links' tracking, even after a transition.
        peerMissed: (peer, offset, length) => this.peerMissed(replicating, peer, offset, length),
        observeLeg: this.ctx.observeLeg(this.volumeName),
      }),
    };
    // Stepping down meanwhile (fenced by a newer primary's handshake while the agent resumed,
    // or demoted): its transition has already stopped the links it could see, and these would
    // outlive the role they serve.
    if (this.phase.role !== 'primary' || this.phase.demoting) {
      authority.stop();
      await tracking.close();
      return;
    }
    this.phase = { ...this.phase, replicating };
    authority.start();
    for (const l of links) l.start();
  }

  /** Stops the links; those in `announceTo` ('all', or addresses) hear that we are leaving. */
  private async stopPeers(announceTo: 'all' | readonly string[]): Promise<void> {
    const p = this.phase;
    if (p.role !== 'primary' || !p.replicating) return;
    const replicating = p.replicating;
    const { links, tracking } = replicating;
    const told = links.filter(
      (l) => l.streaming && (announceTo === 'all' || announceTo.includes(l.address)),
    );
    await Promise.allSettled(told.map((l) => l.announceLeaving()));
    replicating.authority.stop();
    for (const l of links) l.stop();
    // Only now: a link that fails while the others are told still finds its tracking.
    const now = this.phase;
    if (now.role === 'primary' && now.replicating === replicating)
      this.phase = { ...now, replicating: undefined };
    await tracking.close();
  }

  // ---- configuration and roles ---------------------------------------------------------------

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
    /** Keeps the one configured when undefined; stopReplication drops it. */
    mediator?: MediatorConfig,
  ): Promise<void> {
    if (this.phase.role !== 'primary') {
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
    DirtyBitmap.regionCountOf(this.sizeBytes, regionSize); // throws a clear error for a bad region size
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
    const keptMediator = mediator ?? current?.mediator;
    await this.reconfigure(
      peers.length > 0
        ? {
            mode,
            regionSize,
            maxResyncBytesPerSecond,
            peers,
            ...(keptMediator ? { mediator: keptMediator } : {}),
            ...(current?.self ? { self: current.self } : {}),
          }
        : null,
      dropped.map((p) => p.address),
    );
  }

  /** Stops replicating: the peers are told, their tracking is dropped, the copy stands alone. */
  async stopReplication(): Promise<void> {
    const repl = this.meta.replication;
    if (this.phase.role !== 'primary' || !repl) return;
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
    await this.transit(async () => {
      await this.stopPeers(dropped);
      await this.record.save({ ...this.meta, replication });
      for (const peer of dropped) {
        await rm(bitmapFile(this.volume.dir, peer), { force: true });
        await dropEstablishment(this.snapshots, peer);
      }
      if (!replication) await rm(path.join(this.volume.dir, 'activity.log'), { force: true });
      await this.startPeers();
    });
    if (dropped.length > 0) this.announceMembers();
  }

  /**
   * `complete`: the copy will be rolled back to a complete state first (its protection).
   * `replicateTo`: a move's switchover: these peers replace the one this copy followed, as new
   * peers (no bitmap of theirs exists here), so each resyncs from the newest common snapshot.
   */
  async promote(
    force: boolean,
    complete = false,
    replicateTo?: string[],
    grantedEpoch?: number,
  ): Promise<void> {
    // Two callers at once (the operator's monitor and its reconciler, say) make one promotion:
    // the second would otherwise ask the mediator for yet another epoch and start yet another
    // generation.
    while (this.promoting) await this.promoting.catch(() => undefined);
    const p = this.phase;
    if (p.role === 'primary') return;
    if (this.meta.generation.current === ZERO_GENERATION && !force && !complete) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} has never completed its first sync; promoting it would serve incomplete data (use --force to accept that)`,
      );
    }
    if (p.session.primaryActive && !force) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `a primary is replicating volume ${this.volumeName} to this copy; demote it first, or use --force if it is gone`,
      );
    }
    if (replicateTo && !this.meta.replication)
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${this.volumeName} was never replicated to; promote it, then replicate it`,
      );
    this.promoting = (async () =>
      this.promoteIn(grantedEpoch ?? (await this.nextEpoch(force)), force, replicateTo))();
    try {
      await this.promoting;
    } finally {
      this.promoting = undefined;
    }
  }

  /**
   * The epoch a promotion starts: with a mediator, the one it grants (only to a copy it counts
   * as in sync, unless forced); without, the next after ours. A forced promotion whose mediator
   * cannot be reached goes ahead without it: split brain protection is off from then on, and
   * the log and status say so.
   */
  private async nextEpoch(force: boolean): Promise<number> {
    const repl = this.meta.replication;
    if (!repl?.mediator) return this.epoch + 1;
    try {
      return await claimEpoch(
        repl.mediator,
        this.ctx.transport,
        this.identity(),
        this.epoch,
        force,
      );
    } catch (err) {
      if (!force || !isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE')) throw err;
      this.log.error(
        { mediator: repl.mediator.address, err: String(err) },
        'forced promotion without the mediator: split brain protection is off for this volume',
      );
      await this.record.save({ ...this.meta, replication: { ...repl, mediator: undefined } });
      return this.epoch + 1;
    }
  }

  /** Becomes the primary in `epoch` (granted, or ours + 1 without a mediator). */
  private async promoteIn(epoch: number, force: boolean, replicateTo?: string[]): Promise<void> {
    const p = this.phase;
    if (p.role === 'primary') return;
    const repl = this.meta.replication;
    // From now on the old primary (and any other peer) misses our writes until it resyncs.
    const peers = replicateTo
      ? replicateTo.map((address) => ({ address, node: '', bitmapUuid: null }))
      : (repl?.peers ?? []).map((peer) => ({
          ...peer,
          bitmapUuid: this.meta.generation.current,
        }));
    const generation = advance(this.meta.generation, randomUUID());
    if (!replicateTo && repl)
      await startTracking(
        {
          dir: this.volume.dir,
          volumeUuid: this.uuid,
          volumeSize: this.sizeBytes,
          regionSize: repl.regionSize,
        },
        peers.map((p) => p.address),
      );
    // A move's new primary takes its first writes once its replicas stream (or a moment has
    // passed): none is acknowledged by it alone, and none has to be resynced.
    const release = replicateTo ? await this.holdWrites() : undefined;
    try {
      await this.record.save({
        ...this.meta,
        role: 'primary',
        epoch: Math.max(epoch, this.epoch),
        ...(force ? { forcedPromotionAtMs: Date.now() } : {}),
        generation,
        replication: repl && (peers.length > 0 || !replicateTo) ? { ...repl, peers } : null,
      });
      p.session.end('promoted to primary: it takes no more replicated writes');
      this.phase = { role: 'primary', replicating: undefined, demoting: false };
      this.fencedReason = '';
      this.syncWatch();
      this.log.info(
        { force, epoch: this.epoch, generation: generation.current },
        force ? 'promoted to primary (forced)' : 'promoted to primary',
      );
      await this.startPeers();
      if (release) await this.peersStreaming(PEERS_STREAMING_WAIT_MS);
    } finally {
      release?.();
    }
  }

  /** Resolves once every peer link streams, or after `ms`, whichever comes first. */
  private async peersStreaming(ms: number): Promise<void> {
    const deadline = performance.now() + ms;
    while (!this.peerLinks().every((l) => l.streaming) && performance.now() < deadline)
      await new Promise((resolve) => setTimeout(resolve, 5));
  }

  async demote(): Promise<void> {
    const p = this.phase;
    if (p.role === 'secondary') return;
    // Writes are refused from here on (read-only), the ones in flight finish first.
    this.phase = { ...p, demoting: true };
    try {
      await this.transit(async () => {
        await this.flush().catch((err: unknown) =>
          this.log.warn({ err: String(err) }, 'flush before demotion failed'),
        );
        await this.becomeSecondary();
      });
    } finally {
      if (this.phase.role === 'primary') this.phase = { ...this.phase, demoting: false };
    }
    // Its clients reconnect, and find the primary that follows (a planned switchover).
    this.ctx.primaryGone(this.volumeName);
    this.log.info('demoted to secondary');
  }

  /**
   * A move's switchover (snapshot-barrier.ts handOver): demoted while the caller holds the
   * writes, so the ones waiting are refused once released, and none came between.
   */
  async demoteHeld(): Promise<void> {
    if (this.phase.role === 'secondary') return;
    await this.becomeSecondary();
    this.log.info('handed over: demoted to secondary');
  }

  private async becomeSecondary(): Promise<void> {
    // Its next primary is one of the nodes it replicated to: they are the ones it takes.
    const members = this.relationshipNodes();
    await this.stopPeers('all');
    await this.record.save({ ...this.meta, role: 'secondary', members });
    this.phase = { role: 'secondary', session: this.newSession() };
    this.syncWatch();
  }

  /** Throws unless `peer` is in sync and streaming, with nothing left to send it. */
  refuseUnlessCaughtUp(peer: string): void {
    const link = this.peerLinks().find((l) => l.address === peer);
    const tracking = this.phase.role === 'primary' ? this.phase.replicating?.tracking : undefined;
    const dirty = link && tracking ? tracking.bitmap(peer).dirtyBytes() : 0;
    if (link?.state === 'InSync' && link.streaming && dirty === 0) return;
    throw new LockstepError(
      'LOCKSTEP_ERR_NOT_ALLOWED',
      link
        ? `${peer} is ${link.state}${dirty > 0 ? ` with ${dirty} bytes to catch up` : ''}, not in sync with volume ${this.volumeName}; it cannot take over yet`
        : `${peer} is not a peer of volume ${this.volumeName}; replicate to it first`,
    );
  }

  discardPeer(peer: string): void {
    const p = this.phase;
    const link =
      p.role === 'primary' ? p.replicating?.links.find((l) => l.address === peer) : undefined;
    if (!link) {
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `${peer} is not a peer of volume ${this.volumeName} here (run this on the primary; peers are listed by status)`,
      );
    }
    this.log.warn({ peer }, 'operator asked to discard the peer’s diverging writes');
    link.discardPeer();
  }

  // ---- the secondary's side (ReplicaVolume) --------------------------------------------------

  private newSession(): SecondarySession {
    return new SecondarySession({
      name: this.volume.name,
      dir: this.volume.dir,
      meta: this.record,
      local: this.local,
      snapshots: this.snapshots,
    });
  }

  /** Answers a primary's handshake: a session if this copy is a secondary, and its view. */
  async acceptPrimary(primary: PrimaryHello): Promise<{ differs: Buffer; session: string }> {
    if (this.phase.role === 'secondary') {
      await this.phase.session.accept(primary);
      this.syncWatch();
    }
    const differs = await regionsHeldAlone(
      { dir: this.volume.dir, volumeUuid: this.uuid, volumeSize: this.sizeBytes },
      primary.regionSize,
    );
    return { differs, session: this.phase.role === 'secondary' ? this.phase.session.token : '' };
  }

  /** The primary says this copy now holds everything up to `gen`. */
  async adoptGeneration(gen: Generations, epoch: number): Promise<void> {
    await this.session('is a primary here').adoptGeneration(gen, epoch);
    // Caught up with the primary that replaced it: a replica like any other from now on.
    this.fencedReason = '';
  }

  /** A primary with a newer epoch reached this one: resolves once this copy is a secondary. */
  async stepDown(reason: string): Promise<void> {
    this.replaced(reason);
    await this.fencing;
  }

  /** Binds a data lane that presented `token` as lane `index`; throws why not. */
  attachLane(token: string, index: number, epoch: number, lane: ReplicaLane): LaneBinding {
    return this.session('is a primary here; it takes no replicated writes').attach(
      token,
      index,
      epoch,
      lane,
    );
  }

  primaryLeaving(): void {
    if (this.phase.role === 'secondary') this.phase.session.primaryLeaving();
  }

  async adoptMembers(members: readonly string[]): Promise<void> {
    await this.session('is a primary here').adoptMembers(members);
  }

  /**
   * The relationship's nodes changed (a peer caught up under its name, or peers were dropped):
   * every streaming peer learns them, so that it later takes a failover's or a move's new
   * primary from among them, and no other.
   */
  private announceMembers(): void {
    const links = this.phase.role === 'primary' ? (this.phase.replicating?.links ?? []) : [];
    const nodes = this.relationshipNodes();
    for (const link of links) link.announceMembers(nodes);
  }

  private session(refusal: string): SecondarySession {
    if (this.phase.role !== 'secondary')
      throw new LockstepError('LOCKSTEP_ERR_NOT_ALLOWED', `volume ${this.volumeName} ${refusal}`);
    return this.phase.session;
  }

  // ---- status and shutdown -------------------------------------------------------------------

  status(): ReplicationStatus {
    const p = this.phase;
    return replicationStatus({
      meta: this.meta,
      regionSize: this.regionSize,
      primaryConnected: p.role === 'secondary' && p.session.connected,
      links: p.role === 'primary' ? (p.replicating?.links ?? []) : [],
      tracking: p.role === 'primary' ? p.replicating?.tracking : undefined,
      resyncSnapshot: resyncProtection(this.snapshots)?.name ?? '',
      receivedBytes: p.role === 'secondary' ? p.session.receivedBytes : 0,
      protection: this.protection(),
    });
  }

  /** Agent shutdown: writes drained, bitmaps saved, activity log marked clean. */
  async close(): Promise<void> {
    this.watch?.watch.stop();
    this.watch = undefined;
    if (this.phase.role === 'secondary') this.phase.session.end('volume closing');
    await this.drainWrites();
    await this.stopPeers([]);
    await this.record.settled();
  }
}
