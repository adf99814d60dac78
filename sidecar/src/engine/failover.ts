// A secondary becoming the primary through the mediator: the claim (a compare-and-swap of the
// group's record to e+1 with this copy as primary) that every promotion with a mediator makes,
// and the watch that makes it unattended (failover: automatic).
//
// The watch asks only when three things have held together for the grace period: no primary
// streams to this copy (and none said it was stepping down), the mediator answers, and its
// record names this copy among those in sync at the current epoch, i.e. this copy holds every
// write acknowledged in it (epoch-authority.ts is the primary's side of that promise). A
// primary that is alive asks for e+1 as soon as it loses the replica, without a grace period,
// so a mere link cut keeps the primary: the record it gets no longer names the replica. While
// the mediator cannot be reached the grace period starts over, so a primary that was waiting
// for it gets its turn first once it is back.
import type { Transport } from '../../../lib/tls/transport';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { MediatorClient, type MediatorRecord } from '../../../lib/mediator-client';
import type { MediatorConfig } from '../store/volume-metadata';

/** Why a claim was not made or not granted, for errors and status. */
function notEligible(record: MediatorRecord, self: string): string | undefined {
  if (record.primary === self) return undefined;
  if (record.epoch > 0 && !record.inSync.includes(self))
    return `the mediator's epoch ${record.epoch} (primary ${record.primary}) does not count this copy as in sync: it may lack acknowledged writes`;
  return undefined;
}

/**
 * Epoch e+1 for this copy as the only one in sync; returns it. Unless `force`, only a copy the
 * record counts as in sync may claim. Throws if refused (another copy claimed first).
 */
export async function claimEpoch(
  config: MediatorConfig,
  transport: Transport,
  self: string,
  /** The newest epoch this copy has seen: the grant is past it. */
  seen: number,
  force: boolean,
): Promise<number> {
  const client = new MediatorClient(config.address, transport, 3_000);
  try {
    const record = await client.record(config.group);
    const why = notEligible(record, self);
    if (why && !force)
      throw new LockstepError('LOCKSTEP_ERR_NOT_ALLOWED', `${why}; promote --force to accept that`);
    const answer = await client.compareAndSwap(config.group, record.epoch, self, [self], seen + 1);
    if (!answer.granted)
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `the mediator granted epoch ${answer.record.epoch} to ${answer.record.primary} meanwhile; this copy stays a secondary`,
      );
    return answer.record.epoch;
  } finally {
    client.close();
  }
}

export interface WatchedCopy {
  readonly log: Logger;
  readonly transport: Transport;
  identity(): string;
  /** The newest epoch this copy has seen. */
  epoch(): number;
  /** A primary streams to this copy, or said it steps down (a planned switchover). */
  primaryPresent(): boolean;
  /** Promotes this copy in the epoch the mediator just granted it. */
  takeOver(epoch: number, reason: string): Promise<void>;
}

export type WatchState =
  | { kind: 'primary-present' }
  | { kind: 'waiting'; since: number; record: MediatorRecord }
  | { kind: 'not-eligible'; why: string }
  | { kind: 'mediator-unreachable'; why: string }
  | { kind: 'took-over'; epoch: number };

const TICK_MS = 250;

export class FailoverWatch {
  state: WatchState = { kind: 'primary-present' };
  private lostSince = 0;
  private readonly timer: NodeJS.Timeout;
  private readonly client: MediatorClient;
  private busy = false;
  private stopped = false;

  constructor(
    private readonly copy: WatchedCopy,
    private readonly config: MediatorConfig,
  ) {
    this.client = new MediatorClient(config.address, copy.transport, 2_000);
    this.timer = setInterval(() => void this.tick(), TICK_MS);
    this.timer.unref();
  }

  private async tick(): Promise<void> {
    if (this.busy || this.stopped) return;
    if (this.copy.primaryPresent()) {
      this.lostSince = 0;
      this.state = { kind: 'primary-present' };
      return;
    }
    this.busy = true;
    try {
      await this.consider();
    } finally {
      this.busy = false;
    }
  }

  private async consider(): Promise<void> {
    const now = Date.now();
    if (this.lostSince === 0) this.lostSince = now;
    let record: MediatorRecord;
    try {
      record = await this.client.record(this.config.group);
    } catch (err) {
      // The grace period counts only time with the mediator answering.
      this.lostSince = 0;
      this.state = { kind: 'mediator-unreachable', why: errorMessage(err) };
      return;
    }
    if (this.stopped || this.copy.primaryPresent()) return;
    const self = this.copy.identity();
    const why =
      record.epoch === 0
        ? 'the mediator holds no epoch for this volume yet'
        : record.primary === self
          ? 'the mediator already names this copy as primary'
          : notEligible(record, self);
    if (why) {
      this.state = { kind: 'not-eligible', why };
      return;
    }
    this.state = { kind: 'waiting', since: this.lostSince, record };
    if (now - this.lostSince < this.config.graceMs) return;
    const answer = await this.client
      .compareAndSwap(this.config.group, record.epoch, self, [self], this.copy.epoch() + 1)
      .catch((err: unknown) => {
        this.state = { kind: 'mediator-unreachable', why: errorMessage(err) };
        return undefined;
      });
    if (!answer || this.stopped) return;
    if (!answer.granted) {
      this.copy.log.info(
        { epoch: answer.record.epoch, primary: answer.record.primary },
        'failover not granted: another copy holds the group',
      );
      return;
    }
    const reason = `no primary for ${Math.round((now - this.lostSince) / 1000)} s (it was ${record.primary}, epoch ${record.epoch})`;
    this.state = { kind: 'took-over', epoch: answer.record.epoch };
    this.copy.log.warn({ epoch: answer.record.epoch, reason }, 'automatic failover: taking over');
    this.stop();
    await this.copy.takeOver(answer.record.epoch, reason);
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
    this.client.close();
  }
}
