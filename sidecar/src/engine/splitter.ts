// The primary's write path, one write from the NBD request to the reply:
//
//   hold its regions → activity log → admission → legs (peers first, then the local copy) →
//   completion
//
// 1. Overlapping writes wait for each other (region locks), so dependent writes reach every
//    copy in the order they arrived.
// 2. A cold extent is logged durably first: a primary that dies with the write in flight must
//    resync that region to every peer.
// 3. The mode policy (mode-policy.ts) may refuse the write (strict-sync with a peer down), and
//    so may the mediator's fencing (a copy that was replaced, or suspended too long).
// 4. Every streaming peer's op is sent in this turn's batch, and the local write starts right
//    after that batch is on the wire (SendBatch), so the round trip overlaps the local write.
//    A peer that cannot take the op misses it: its bitmap is marked, and the policy says what
//    that does to the write; with a mediator, a peer counted as in sync must first be dropped
//    from its record. A leg never throws synchronously: a miss is the leg's outcome.
// 5. The policy's completion rule says when the client is answered: once every copy has the
//    write, or (async, within its backlog) once the local copy has it.
import { errorMessage } from '../../../lib/errors';
import { OpFlag, OpKind } from '../replication/frames';
import { PeerUnavailable, type PeerLink } from '../replication/peer-link';
import type { SendBatch } from '../replication/send-batch';
import type { BlockDevice, ZeroOptions } from '../block-device';
import type { Backlog, ModePolicy, PeerView } from './mode-policy';
import { PeerOrder } from './peer-order';
import { RegionLocks } from './region-locks';

/**
 * One peer as the write path uses it: a PeerLink (a fake in unit tests). `send` resolves when the
 * peer acknowledged the op; `fail` (idempotent) drops a connection whose copy failed an op;
 * `resyncInPlace` copies back regions the local copy failed to write after the peer took them.
 */
export interface PeerLeg extends PeerView, Pick<PeerLink, 'send' | 'fail' | 'resyncInPlace'> {}

/** The activity log as the write path uses it. */
export interface ActiveRegions {
  /** Undefined, or a promise that settles once the range is durably in the log. */
  ensure(offset: number, length: number): Promise<void> | undefined;
  /** Every copy has the write: the range may leave the log. */
  release(offset: number, length: number): void;
}

/** The primary's standing at the mediator as the write path uses it (epoch-authority.ts). */
export interface Fencing {
  /** Undefined if a write may start; else the error it fails with (fenced, suspended). */
  admit(): Error | undefined;
  /** Undefined if a write `peer` missed may be answered; else when it may (or its EIO). */
  missed(peer: string): Promise<void> | undefined;
}

export interface SplitterParts {
  local: BlockDevice;
  peers: readonly PeerLeg[];
  policy: ModePolicy;
  authority: Fencing;
  regionSize: number;
  batch: SendBatch;
  activity: ActiveRegions;
  /** The peer misses the range: recorded in its bitmap (by that bitmap's one owner). */
  peerMissed(peer: string, offset: number, length: number): void;
  /** Takes how long a sampled write's legs took: the local copy's, and the slowest peer's. */
  observeLeg?: (leg: WriteLeg, seconds: number) => void;
}

export type WriteLeg = 'local' | 'remote';

/** One write in 8 has its legs timed: plenty for a histogram, and nothing added to the rest. */
const LEG_SAMPLE_MASK = 7;

export class Splitter implements BlockDevice {
  private readonly locks = new RegionLocks();
  /** Async ops answered on the local copy and still on their way to the peers, by region. */
  private readonly peerOrder = new PeerOrder();
  private readonly backlog: Backlog = { writes: 0, bytes: 0 };
  /** Writes between their arrival (a write waiting for its regions counts) and their last leg. */
  private inFlight = 0;
  private idle: (() => void)[] = [];
  private writes = 0;

  constructor(private readonly parts: SplitterParts) {}

  get size(): number {
    return this.parts.local.size;
  }
  get readOnly(): boolean {
    return this.parts.local.readOnly;
  }

  read(offset: number, target: Buffer): Promise<void> {
    return this.parts.local.read(offset, target);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.replicate(
      offset,
      data.length,
      () => this.parts.local.write(offset, data, fua),
      OpKind.WRITE,
      data,
      fua ? OpFlag.FUA : 0,
    );
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.replicate(
      offset,
      length,
      () => this.parts.local.writeZeroes(offset, length, opts),
      OpKind.ZERO,
      undefined,
      opts.fua ? OpFlag.FUA : 0,
    );
  }

  trim(offset: number, length: number): Promise<void> {
    // Trim changes nothing on any copy (see FileBlockDevice), so nothing to replicate.
    return this.parts.local.trim(offset, length);
  }

  /** Durable on the local copy and every streaming peer; a peer that misses it is the policy's. */
  async flush(): Promise<void> {
    const { local, peers, policy } = this.parts;
    const legs: Promise<void>[] = [local.flush()];
    for (const peer of peers) {
      legs.push(
        peer.streaming
          ? peer
              .send(OpKind.FLUSH, 0, 0, undefined, 0, policy.route)
              .catch((err: unknown) => this.flushMissed(peer, err))
          : this.flushMissed(peer),
      );
    }
    const results = await Promise.allSettled(legs);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * Settles once no write is between its arrival and its last leg: one still waiting for an
   * overlapping write's regions counts too, or it would start after the drain (after a
   * snapshot's cut here, say) but could reach a peer before that peer's cut.
   */
  drain(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /**
   * Runs `work` with regions [first, last] locked against live writes, once the ops on them
   * still on their way to the peers (async writes already answered) have been answered: what
   * `work` sends (a resync copy) then reaches the peer after them, not before.
   */
  async withRegionsLocked<T>(first: number, last: number, work: () => Promise<T>): Promise<T> {
    const wait = this.locks.acquire(first, last);
    if (wait) await wait;
    try {
      const ahead = this.peerOrder.after(first, last);
      if (ahead) await ahead;
      return await work();
    } finally {
      this.locks.release(first, last);
    }
  }

  // ---- one write -----------------------------------------------------------------------------

  private async replicate(
    offset: number,
    length: number,
    localOp: () => Promise<void>,
    kind: OpKind,
    data: Buffer | undefined,
    flags: number,
  ): Promise<void> {
    const { activity, policy, regionSize } = this.parts;
    const first = Math.floor(offset / regionSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / regionSize);
    this.inFlight++;
    const wait = this.locks.acquire(first, last);
    if (wait) await wait;
    const unlock = () => this.locks.release(first, last);
    // The activity log keeps the regions until every copy has the write.
    const settled = () => {
      activity.release(offset, length);
      if (--this.inFlight === 0) for (const wake of this.idle.splice(0)) wake();
    };
    try {
      const logged = activity.ensure(offset, length);
      if (logged) await logged;
      const refusal = policy.admit(this.parts.peers) ?? this.parts.authority.admit();
      if (refusal) throw refusal;
    } catch (err) {
      unlock();
      settled();
      throw err;
    }

    const completion = policy.completion(this.backlog, length);
    // Answered before the peers have it, the caller may reuse its buffer: the peers get a copy.
    const payload = completion === 'local-copy' && data ? Buffer.from(data) : data;
    const timed = this.parts.observeLeg && (++this.writes & LEG_SAMPLE_MASK) === 0;
    const startedAt = timed ? performance.now() : 0;
    const peers = this.toPeers(kind, offset, length, payload, flags);
    const local = this.parts.batch.afterSend(localOp);
    if (timed) this.timeLegs(startedAt, local, peers);

    if (completion === 'all-copies') {
      const results = await Promise.allSettled([local, ...peers]);
      unlock();
      settled();
      if (results[0].status === 'rejected') {
        this.localFailed(offset, length);
        throw results[0].reason;
      }
      for (const r of results) if (r.status === 'rejected') throw r.reason;
      return;
    }

    // Answered and unlocked once on the local copy; a later op on these regions that does not
    // travel in order with this one waits for it (withRegionsLocked).
    this.backlog.writes++;
    this.backlog.bytes += length;
    this.peerOrder.record(
      first,
      last,
      Promise.allSettled(peers).then(() => undefined),
    );
    void local.then(unlock, unlock);
    void Promise.allSettled([local, ...peers]).then(() => {
      this.backlog.writes--;
      this.backlog.bytes -= length;
      settled();
    });
    try {
      await local;
    } catch (err) {
      this.localFailed(offset, length);
      throw err;
    }
  }

  private timeLegs(startedAt: number, local: Promise<void>, peers: Promise<void>[]): void {
    const observe = this.parts.observeLeg;
    if (!observe) return;
    const took = (leg: WriteLeg) => () => observe(leg, (performance.now() - startedAt) / 1000);
    local.then(took('local'), () => undefined);
    if (peers.length) void Promise.allSettled(peers).then(took('remote'));
  }

  /** One leg per peer; each settles as the peer's outcome (acked, or missed by the policy). */
  private toPeers(
    kind: OpKind,
    offset: number,
    length: number,
    data: Buffer | undefined,
    flags: number,
  ): Promise<void>[] {
    const { peers, policy } = this.parts;
    const legs: Promise<void>[] = [];
    for (const peer of peers) {
      // Whatever happens, a leg is a promise: a throw here would leave the regions locked.
      try {
        legs.push(
          peer.streaming
            ? peer
                .send(kind, offset, length, data, flags, policy.route)
                .catch((err: unknown) => this.missed(peer, offset, length, err))
            : this.missed(peer, offset, length),
        );
      } catch (err) {
        legs.push(Promise.reject(err instanceof Error ? err : new Error(String(err))));
      }
    }
    return legs;
  }

  /** A peer did not take the write: its bitmap records it; the policy says what the write gets. */
  private missed(peer: PeerLeg, offset: number, length: number, err?: unknown): Promise<void> {
    this.parts.peerMissed(peer.address, offset, length);
    return this.flushMissed(peer, err);
  }

  /**
   * The mode's rule first (strict-sync fails the write); then, with a mediator, the write is
   * answered only once the peer no longer counts as in sync (epoch-authority.ts).
   */
  private flushMissed(peer: PeerLeg, err?: unknown): Promise<void> {
    this.failFor(peer, err);
    const refusal = this.parts.policy.missed(peer);
    if (refusal) return Promise.reject(refusal);
    return this.parts.authority.missed(peer.address) ?? Promise.resolve();
  }

  /**
   * A peer's copy that failed an op (an I/O error, a full disk) is disconnected and resynced.
   * A PeerUnavailable came from the link itself, which has already failed: failing it again
   * would only bump its backoff.
   */
  private failFor(peer: PeerLeg, err: unknown): void {
    if (err !== undefined && !(err instanceof PeerUnavailable)) peer.fail(errorMessage(err));
  }

  /** The local write failed: the peers may hold data we do not; resync makes them ours again. */
  private localFailed(offset: number, length: number): void {
    for (const peer of this.parts.peers) {
      this.parts.peerMissed(peer.address, offset, length);
      peer.resyncInPlace();
    }
  }
}
