// Leader election on a coordination.k8s.io/v1 Lease, with client-go's leaderelection rules.
// Every write is conditioned on the resourceVersion we read, so when two candidates race the
// apiserver picks one and the other gets a 409. A lease held by someone else counts as expired
// only when it has not changed for leaseDurationSeconds *as measured by our own clock* since we
// saw it change: clocks of different nodes never get compared, so skew cannot hand the lease
// to a second leader.
import {
  ApiException,
  CoordinationV1Api,
  V1MicroTime,
  type KubeConfig,
  type V1Lease,
} from '@kubernetes/client-node';
import type { Logger } from '../../../lib/logger';

export interface LeaderElectionOptions {
  kc: KubeConfig;
  namespace: string;
  name: string;
  identity: string;
  /** How long standbys wait, after the lease last changed, before taking it. */
  leaseDurationMs?: number;
  /** How long the leader keeps leading without a successful renewal. */
  renewDeadlineMs?: number;
  /** Time between attempts to acquire or renew. */
  retryPeriodMs?: number;
  log: Logger;
}

export class ElectionEndedError extends Error {
  readonly code = 'LOCKSTEP_ERR_ELECTION_ENDED';
  constructor() {
    super('release() was called before this elector acquired the lease');
  }
}

type Attempt = 'acquired' | 'held-by-other' | 'conflict';

export class LeaderElector {
  /**
   * Resolves when leadership ends: renewal failed for renewDeadline, another holder took the
   * lease, or release() was called (so a caller waiting on it never hangs at shutdown).
   */
  readonly lost: Promise<void>;
  private resolveLost!: () => void;
  private readonly api: CoordinationV1Api;
  private readonly log: Logger;
  private readonly leaseDurationMs: number;
  private readonly renewDeadlineMs: number;
  private readonly retryPeriodMs: number;
  private state: 'idle' | 'campaigning' | 'leading' | 'ended' = 'idle';
  /** The lease as we last read or wrote it: its resourceVersion conditions the next write. */
  private lease: V1Lease | undefined;
  /** When (by our clock) we first saw the lease's current version. */
  private observed: { resourceVersion: string; at: number } | undefined;
  private inFlight: Promise<unknown> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private wakeCampaign: (() => void) | undefined;

  constructor(private readonly options: LeaderElectionOptions) {
    this.api = options.kc.makeApiClient(CoordinationV1Api);
    this.log = options.log.child({ lease: `${options.namespace}/${options.name}` });
    this.leaseDurationMs = options.leaseDurationMs ?? 15_000;
    this.renewDeadlineMs = options.renewDeadlineMs ?? 10_000;
    this.retryPeriodMs = options.retryPeriodMs ?? 2_000;
    if (!(this.leaseDurationMs > this.renewDeadlineMs && this.renewDeadlineMs > this.retryPeriodMs))
      // Otherwise a leader could still believe it leads after a standby has taken over.
      throw new Error('leader election needs leaseDurationMs > renewDeadlineMs > retryPeriodMs');
    this.lost = new Promise<void>((resolve) => (this.resolveLost = resolve));
  }

  get isLeader(): boolean {
    return this.state === 'leading';
  }

  /** Campaigns until it leads; resolves then. Keeps renewing in the background. */
  async acquire(): Promise<void> {
    if (this.state !== 'idle') throw new Error('acquire() can be called once per elector');
    this.state = 'campaigning';
    this.log.info({ identity: this.options.identity }, 'campaigning for leadership');
    for (;;) {
      if (this.state !== 'campaigning') throw new ElectionEndedError();
      const startedAt = Date.now();
      const result = await this.attempt();
      if (this.state !== 'campaigning') throw new ElectionEndedError();
      if (result === 'acquired') {
        this.state = 'leading';
        this.log.info(
          { identity: this.options.identity, transitions: this.lease?.spec?.leaseTransitions },
          'became leader',
        );
        this.armDeadline(startedAt);
        this.scheduleRenew();
        return;
      }
      // Jitter keeps standbys that started together from polling in step.
      await new Promise<void>((resolve) => {
        this.wakeCampaign = resolve;
        this.retryTimer = setTimeout(resolve, this.retryPeriodMs * (1 + 0.2 * Math.random()));
      });
    }
  }

  /** Stops renewing; if leading, releases the Lease (holderIdentity cleared, so a standby takes over at once). */
  async release(): Promise<void> {
    if (this.state === 'ended') return;
    this.state = 'ended';
    clearTimeout(this.retryTimer);
    clearTimeout(this.deadlineTimer);
    this.wakeCampaign?.();
    // A write still in flight would change the resourceVersion under our release, and may be
    // the one that made us holder while release() was being called.
    await this.inFlight;
    if (this.lease && this.lease.spec?.holderIdentity === this.options.identity) {
      const now = new V1MicroTime();
      try {
        await this.api.replaceNamespacedLease({
          name: this.options.name,
          namespace: this.options.namespace,
          body: {
            ...this.lease,
            spec: {
              ...this.lease.spec,
              holderIdentity: '',
              leaseDurationSeconds: 1,
              acquireTime: now,
              renewTime: now,
            },
          },
        });
        this.log.info('released leadership');
      } catch (err) {
        // Not fatal: standbys take over once the lease expires.
        this.log.warn({ err: describe(err) }, 'could not release the lease');
      }
    }
    this.resolveLost();
  }

  private scheduleRenew(): void {
    this.retryTimer = setTimeout(() => void this.renew(), this.retryPeriodMs);
  }

  private async renew(): Promise<void> {
    const startedAt = Date.now();
    const result = await this.attempt();
    if (this.state !== 'leading') return;
    if (result === 'acquired') this.armDeadline(startedAt);
    else if (result === 'held-by-other') {
      this.lose('another candidate holds the lease');
      return;
    }
    this.scheduleRenew();
  }

  /**
   * Leadership lasts renewDeadline past the start of the last successful renewal (its renewTime
   * can be no earlier), whatever the requests in flight are doing: a hung request must not
   * extend it.
   */
  private armDeadline(renewStartedAt: number): void {
    clearTimeout(this.deadlineTimer);
    this.deadlineTimer = setTimeout(
      () => this.lose(`could not renew the lease within ${this.renewDeadlineMs} ms`),
      Math.max(0, renewStartedAt + this.renewDeadlineMs - Date.now()),
    );
  }

  private lose(why: string): void {
    if (this.state !== 'leading') return;
    this.state = 'ended';
    clearTimeout(this.retryTimer);
    clearTimeout(this.deadlineTimer);
    this.log.error({ identity: this.options.identity }, `lost leadership: ${why}`);
    this.resolveLost();
  }

  /** One try, failures logged; bounded by renewDeadline so a hung request cannot stall us. */
  private async attempt(): Promise<Attempt | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const bounded = Promise.race([
      this.tryAcquireOrRenew(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`no answer within ${this.renewDeadlineMs} ms`)),
          this.renewDeadlineMs,
        );
      }),
    ]);
    // release() waits for this, never for a request that may hang forever.
    this.inFlight = bounded.catch(() => {});
    try {
      return await bounded;
    } catch (err) {
      this.log.warn({ err: describe(err) }, 'could not acquire or renew the lease');
      return undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  private async tryAcquireOrRenew(): Promise<Attempt> {
    const { name, namespace, identity } = this.options;
    const now = new V1MicroTime();
    const leaseDurationSeconds = Math.ceil(this.leaseDurationMs / 1000);
    let current: V1Lease;
    try {
      current = await this.api.readNamespacedLease({ name, namespace });
    } catch (err) {
      if (!(err instanceof ApiException && err.code === 404)) throw err;
      const body: V1Lease = {
        metadata: { name, namespace },
        spec: {
          holderIdentity: identity,
          leaseDurationSeconds,
          acquireTime: now,
          renewTime: now,
          leaseTransitions: 0,
        },
      };
      return this.write(() => this.api.createNamespacedLease({ namespace, body }));
    }
    this.observe(current);
    const spec = current.spec ?? {};
    const holder = spec.holderIdentity ?? '';
    const ours = holder === identity;
    if (holder !== '' && !ours && !this.expired(spec.leaseDurationSeconds)) return 'held-by-other';
    const transitions = spec.leaseTransitions ?? 0;
    const body: V1Lease = {
      ...current,
      spec: {
        ...spec,
        holderIdentity: identity,
        leaseDurationSeconds,
        acquireTime: ours ? spec.acquireTime : now,
        renewTime: now,
        leaseTransitions: ours ? transitions : transitions + 1,
      },
    };
    return this.write(() => this.api.replaceNamespacedLease({ name, namespace, body }));
  }

  private async write(request: () => Promise<V1Lease>): Promise<Attempt> {
    try {
      this.lease = await request();
    } catch (err) {
      // Someone else created or updated it between our read and our write: they won this round.
      if (err instanceof ApiException && err.code === 409) return 'conflict';
      throw err;
    }
    this.observe(this.lease);
    return 'acquired';
  }

  private observe(lease: V1Lease): void {
    const resourceVersion = lease.metadata?.resourceVersion ?? '';
    if (this.observed?.resourceVersion !== resourceVersion) {
      this.observed = { resourceVersion, at: Date.now() };
    }
  }

  private expired(leaseDurationSeconds: number | undefined): boolean {
    const durationMs = (leaseDurationSeconds ?? 0) * 1000;
    return this.observed !== undefined && this.observed.at + durationMs <= Date.now();
  }
}

export function describe(err: unknown): string {
  // An ApiException's message carries the whole response, headers included; the status and
  // the apiserver's own message are what a reader needs.
  if (err instanceof ApiException) {
    let message = '';
    try {
      message = (JSON.parse(String(err.body)) as { message?: string }).message ?? '';
    } catch {
      // A body that is not a Status object says nothing more than the code.
    }
    return `HTTP ${err.code}${message ? `: ${message}` : ''}`;
  }
  return err instanceof Error ? err.message : String(err);
}
