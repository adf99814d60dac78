// A primary's standing at the mediator: the one owner of "may this copy acknowledge a write that
// a peer did not take?". The mediator's record for the group says which copies were in sync
// when its epoch began; every write acknowledged in that epoch must be on all of them, so a
// replica the record names may be promoted with nothing lost. A write that such a peer missed
// is therefore answered only once the primary holds a newer epoch whose record leaves the peer
// out: it asks the mediator for e+1 with itself and the peers still streaming (a compare-and-
// swap on e). Granted, the write is answered and the peer's bitmap tracks what it misses;
// refused, another copy holds the group: this one fences itself (it demotes, and every write
// waiting or arriving fails with EIO). While the mediator cannot be reached, writes wait, up to
// the suspend limit, then fail with EIO; they never resume without a grant.
//
//   standing      writes a recorded peer missed     how it leaves
//   unprotected   answered (no mediator: split       a mediator is configured
//                 brain protection is off)
//   confirming    wait                               the record is read (start, restart)
//   holding       (none missed)                      a recorded peer misses a write or drops
//   seeking       wait, then EIO past the limit      a grant (holding), a refusal (fenced)
//   fenced        EIO                                never: the copy is demoted
//
// Peers are added to the record the same way once they catch up (include), so a replica that
// just finished a resync becomes eligible to take over only when nothing it lacks can have been
// acknowledged.
import type { Transport } from '../../../lib/tls/transport';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { MediatorClient, type MediatorRecord } from '../../../lib/mediator-client';
import type { MediatorConfig } from '../store/volume-metadata';

export type Standing =
  | { kind: 'unprotected' }
  | { kind: 'confirming'; since: number }
  | { kind: 'holding' }
  | { kind: 'seeking'; since: number; why: string }
  | { kind: 'fenced'; reason: string };

export interface AuthorityHost {
  readonly log: Logger;
  readonly transport: Transport;
  readonly volumeName: string;
  /** This copy's name in the mediator's records. */
  identity(): string;
  /** The epoch this copy last held or saw. */
  epoch(): number;
  /** Persists a granted epoch before anything acts on it. */
  saveEpoch(epoch: number): Promise<void>;
  /** Another copy holds the group: stop being a primary. */
  fence(reason: string): void;
  /** A granted epoch no longer counts these peers: what they miss from now on diverges. */
  peersDropped(peers: string[]): void;
}

interface Waiter {
  peer: string;
  /** Resolves when the record no longer names `peer` (missed) or names it (include). */
  until: 'excluded' | 'included';
  resolve: () => void;
  reject: (err: Error) => void;
}

const RETRY_MS = 500;

export class EpochAuthority {
  private recorded = new Set<string>();
  /** The record this copy wants: the peers it may count on. */
  private readonly desired = new Set<string>();
  private confirmed = false;
  /** The epoch of the last record this copy read or wrote: the next swap expects it. */
  private recordEpoch = 0;
  /** The group was never set: a swap claims it even though nothing else changes. */
  private claim = false;
  /** Peers that missed a write before the record was read. */
  private readonly droppedEarly = new Set<string>();
  private fencedBy: string | undefined;
  private seekingSince = 0;
  private waiters: Waiter[] = [];
  private running: Promise<void> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Last time a call to the mediator failed, and why (for status). */
  unreachable = '';
  private readonly client: MediatorClient | undefined;

  constructor(
    private readonly host: AuthorityHost,
    private readonly config: MediatorConfig | undefined,
    /** Strict-sync: a missed write fails anyway, so the record never has to drop a peer. */
    private readonly strict: boolean,
  ) {
    this.client = config && new MediatorClient(config.address, host.transport, 3_000);
  }

  get standing(): Standing {
    if (!this.config) return { kind: 'unprotected' };
    if (this.fencedBy !== undefined) return { kind: 'fenced', reason: this.fencedBy };
    if (!this.confirmed) return { kind: 'confirming', since: this.seekingSince };
    if (this.differs())
      return {
        kind: 'seeking',
        since: this.seekingSince,
        why: this.unreachable || 'asking the mediator for a new epoch',
      };
    return { kind: 'holding' };
  }

  /** The peers recorded in sync with this copy at its epoch. */
  get inSync(): string[] {
    return [...this.recorded];
  }

  /** Reads the record (a primary starting, restarting or just promoted) before writes count. */
  start(): void {
    if (!this.config) return;
    this.seekingSince = Date.now();
    this.kick();
  }

  /** Undefined if a write may start; else the error it fails with. */
  admit(): LockstepError | undefined {
    if (this.fencedBy !== undefined) return this.fencedError();
    if (this.pastLimit()) return this.suspendedError();
    return undefined;
  }

  /**
   * `peer` did not take a write: undefined if the write may be answered anyway, else a promise
   * that settles when it may (or rejects with the EIO the write fails with).
   */
  missed(peer: string): Promise<void> | undefined {
    if (!this.config || this.strict) return undefined;
    if (this.confirmed && !this.recorded.has(peer) && this.fencedBy === undefined) {
      if (this.desired.has(peer)) this.exclude(peer);
      return undefined;
    }
    this.exclude(peer);
    return this.wait(peer, 'excluded');
  }

  /**
   * A recorded peer stopped streaming: the record drops it at once, idle or not (the primary's
   * head start over a replica that lost it too). Strict-sync only asks whether it was replaced.
   */
  lost(peer: string): void {
    if (!this.config || this.stopped || this.fencedBy !== undefined) return;
    if (this.strict) {
      void this.verify().catch((err: unknown) => (this.unreachable = errorMessage(err)));
      return;
    }
    if (this.desired.has(peer)) this.exclude(peer);
  }

  /** `peer` caught up: resolves once the record names it (so it may take over), else throws. */
  async include(peer: string): Promise<void> {
    if (!this.config) return;
    if (this.confirmed && this.recorded.has(peer)) return;
    this.desired.add(peer);
    this.kick();
    await this.wait(peer, 'included');
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.client?.close();
    const err = new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', 'the primary stopped replicating');
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  // ---- the record ----------------------------------------------------------------------------

  private exclude(peer: string): void {
    this.desired.delete(peer);
    if (!this.confirmed) this.droppedEarly.add(peer);
    if (this.seekingSince === 0 || !this.differs()) this.seekingSince = Date.now();
    this.kick();
  }

  private differs(): boolean {
    if (this.desired.size !== this.recorded.size) return true;
    for (const p of this.desired) if (!this.recorded.has(p)) return true;
    return false;
  }

  private wait(peer: string, until: Waiter['until']): Promise<void> {
    if (this.fencedBy !== undefined) return Promise.reject(this.fencedError());
    if (until === 'excluded' && this.pastLimit()) return Promise.reject(this.suspendedError());
    return new Promise((resolve, reject) => this.waiters.push({ peer, until, resolve, reject }));
  }

  /** One compare-and-swap loop at a time; it runs until the record is what this copy wants. */
  private kick(): void {
    if (this.running || this.stopped || this.fencedBy !== undefined) return;
    clearTimeout(this.retryTimer);
    this.running = this.reconcile()
      .catch((err: unknown) => {
        this.unreachable = errorMessage(err);
        this.host.log.warn({ err: this.unreachable }, 'mediator call failed; retrying');
        this.settle();
        if (!this.stopped) {
          this.retryTimer = setTimeout(() => this.kick(), RETRY_MS);
          this.retryTimer.unref();
        }
      })
      .finally(() => {
        this.running = undefined;
      });
  }

  private async reconcile(): Promise<void> {
    const client = this.client!;
    const { group } = this.config!;
    const self = this.host.identity();
    if (!this.confirmed) {
      const record = await client.record(group);
      this.unreachable = '';
      if (!(await this.adopt(record, self))) return;
      // A group never set: this copy claims it, with no peer counted on yet.
      this.claim = record.epoch === 0;
      // The peers stay counted on until one misses a write or drops: a clean restart keeps a
      // replica's right to take over.
      this.desired.clear();
      for (const p of this.recorded) if (!this.droppedEarly.has(p)) this.desired.add(p);
      this.confirmed = true;
      this.settle();
    }
    while (!this.stopped && (this.claim || this.differs())) {
      const inSync = [self, ...this.desired];
      const answer = await client.compareAndSwap(
        group,
        this.recordEpoch,
        self,
        inSync,
        this.host.epoch() + 1,
      );
      this.unreachable = '';
      if (answer.granted) {
        await this.host.saveEpoch(answer.record.epoch);
        this.recordEpoch = answer.record.epoch;
        const dropped = [...this.recorded].filter((p) => !inSync.includes(p));
        this.recorded = new Set(inSync.filter((c) => c !== self));
        if (dropped.length > 0) this.host.peersDropped(dropped);
        this.claim = false;
        this.host.log.info({ epoch: answer.record.epoch, inSync }, 'mediator granted a new epoch');
      } else if (!(await this.adopt(answer.record, self))) {
        return;
      }
      this.settle();
    }
    this.seekingSince = 0;
  }

  /**
   * Takes in a record this copy did not just write: its own (granted earlier, the answer lost
   * or the process restarted) is adopted; another copy's means this one was replaced.
   */
  private async adopt(record: MediatorRecord, self: string): Promise<boolean> {
    this.recordEpoch = record.epoch;
    if (record.epoch === 0) return true;
    if (record.primary !== self) {
      this.fence(
        `the mediator granted epoch ${record.epoch} to ${record.primary}: this copy was replaced`,
      );
      return false;
    }
    await this.host.saveEpoch(record.epoch);
    this.recorded = new Set(record.inSync.filter((c) => c !== self));
    return true;
  }

  /** Strict-sync lost a peer: its writes already fail; the record says whether it was replaced. */
  private async verify(): Promise<void> {
    const record = await this.client!.record(this.config!.group);
    this.unreachable = '';
    await this.adopt(record, this.host.identity());
  }

  /** Another copy holds a newer epoch (from the mediator, or a peer's ESTALE). */
  fence(reason: string): void {
    if (this.fencedBy !== undefined || this.stopped) return;
    this.fencedBy = reason;
    this.host.log.error({ reason }, 'fenced: this copy stops acknowledging writes');
    // The host cuts its clients first: writes waiting here are then lost with the connection
    // (a client sends them again to the new primary) rather than failed with EIO.
    this.host.fence(reason);
    this.settle();
  }

  /** Wakes the waiters the current record answers. */
  private settle(): void {
    const keep: Waiter[] = [];
    for (const w of this.waiters) {
      if (this.fencedBy !== undefined) w.reject(this.fencedError());
      else if (w.until === 'excluded' && this.confirmed && !this.recorded.has(w.peer)) w.resolve();
      else if (w.until === 'included' && this.recorded.has(w.peer)) w.resolve();
      else if (w.until === 'included' && (!this.desired.has(w.peer) || this.unreachable))
        w.reject(
          new LockstepError(
            'LOCKSTEP_ERR_UNAVAILABLE',
            `the mediator did not record ${w.peer} as in sync: ${this.unreachable || 'it fell behind again'}`,
          ),
        );
      else if (w.until === 'excluded' && this.pastLimit()) w.reject(this.suspendedError());
      else keep.push(w);
    }
    this.waiters = keep;
    if (keep.some((w) => w.until === 'excluded') && this.config!.suspendLimitMs > 0) {
      // The limit passes between retries too.
      const left = this.seekingSince + this.config!.suspendLimitMs - Date.now();
      setTimeout(() => this.settle(), Math.max(0, left) + 1).unref();
    }
  }

  private pastLimit(): boolean {
    return (
      this.config !== undefined &&
      this.seekingSince > 0 &&
      (this.differs() || !this.confirmed) &&
      Date.now() - this.seekingSince >= this.config.suspendLimitMs
    );
  }

  private fencedError(): LockstepError {
    return new LockstepError(
      'LOCKSTEP_ERR_IO',
      `volume ${this.host.volumeName} is fenced: ${this.fencedBy}; it acknowledges no more writes`,
    );
  }

  private suspendedError(): LockstepError {
    return new LockstepError(
      'LOCKSTEP_ERR_IO',
      `volume ${this.host.volumeName} lost a peer in sync and cannot reach the mediator at ${this.config!.address} ` +
        `for ${Math.round((Date.now() - this.seekingSince) / 1000)} s (${this.unreachable || 'no answer'}): ` +
        'writes fail until it grants this copy a new epoch',
    );
  }
}
