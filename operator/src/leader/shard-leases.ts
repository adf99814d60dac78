// Sharded monitoring: the relationships are split into a fixed number of shards by a hash of
// their key, and each operator replica monitors the shards whose Lease it holds. Every replica
// also renews a member Lease, so each knows how many replicas share the work and takes no more
// than its fair share: a replica that joins gets shards released to it, and the shards of one
// that dies are taken by the others once their Leases lapse.
//
// The same rules as leader election (lease-election.ts): every write is conditioned on the
// resourceVersion read, a Lease held by another counts as lapsed only when it has not changed
// for its duration by our own clock, and a holder stops acting renewDeadline after the start of
// its last successful renewal, well before anyone else may take the shard over.
import { createHash } from 'node:crypto';
import {
  ApiException,
  CoordinationV1Api,
  V1MicroTime,
  type KubeConfig,
  type V1Lease,
} from '@kubernetes/client-node';
import type { Logger } from '../../../lib/logger';
import { describe } from './lease-election';

export const SHARD_LABEL = 'lockstep.dev/monitor';
const SHARD_PREFIX = 'lockstep-monitor-shard-';
const MEMBER_PREFIX = 'lockstep-monitor-member-';

export interface ShardLeaseOptions {
  kc: KubeConfig;
  namespace: string;
  identity: string;
  shards: number;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  log: Logger;
}

/** The shard a key (namespace/name) belongs to, the same in every replica. */
export function shardOf(key: string, shards: number): number {
  return createHash('sha256').update(key).digest().readUInt32BE(0) % shards;
}

/** A Lease name for a member: identities carry a host name, which need not be a DNS label. */
function memberLeaseName(identity: string): string {
  return MEMBER_PREFIX + createHash('sha256').update(identity).digest('hex').slice(0, 16);
}

export class ShardLeases {
  private readonly api: CoordinationV1Api;
  private readonly leaseDurationMs: number;
  private readonly renewDeadlineMs: number;
  private readonly retryPeriodMs: number;
  /** Shards held, each with the start of its last successful renewal (our clock). */
  private readonly held = new Map<number, number>();
  /** When (our clock) we first saw each Lease's current version. */
  private readonly observed = new Map<string, { resourceVersion: string; at: number }>();
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  private stopped = false;

  constructor(private readonly options: ShardLeaseOptions) {
    this.api = options.kc.makeApiClient(CoordinationV1Api);
    this.leaseDurationMs = options.leaseDurationMs ?? 15_000;
    this.renewDeadlineMs = options.renewDeadlineMs ?? 10_000;
    this.retryPeriodMs = options.retryPeriodMs ?? 2_000;
    if (!(this.leaseDurationMs > this.renewDeadlineMs && this.renewDeadlineMs > this.retryPeriodMs))
      throw new Error('shard leases need leaseDurationMs > renewDeadlineMs > retryPeriodMs');
  }

  /** This replica monitors `key` now. */
  owns(key: string): boolean {
    return this.ownsShard(shardOf(key, this.options.shards));
  }

  /** The shards held now, for logs and tests. */
  get shards(): number[] {
    return [...this.held.keys()].filter((s) => this.ownsShard(s)).sort((a, b) => a - b);
  }

  private ownsShard(shard: number): boolean {
    const since = this.held.get(shard);
    return since !== undefined && Date.now() - since < this.renewDeadlineMs;
  }

  start(): void {
    const loop = async () => {
      if (this.stopped) return;
      this.ticking = this.tick().catch((err: unknown) =>
        this.options.log.warn({ err: describe(err) }, 'shard leases: pass failed'),
      );
      await this.ticking;
      if (!this.stopped)
        this.timer = setTimeout(() => void loop(), this.retryPeriodMs * (1 + 0.2 * Math.random()));
    };
    void loop();
  }

  /** Stops renewing and hands the shards back at once (holder cleared), so others take them. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.ticking;
    const leases = await this.list().catch(() => [] as V1Lease[]);
    for (const lease of leases) {
      const mine = lease.spec?.holderIdentity === this.options.identity;
      const name = lease.metadata?.name ?? '';
      if (!mine) continue;
      if (name.startsWith(MEMBER_PREFIX)) await this.remove(lease);
      else await this.write(lease, '').catch(() => undefined);
    }
    this.held.clear();
  }

  private async list(): Promise<V1Lease[]> {
    const { namespace } = this.options;
    return (await this.api.listNamespacedLease({ namespace, labelSelector: SHARD_LABEL })).items;
  }

  private async tick(): Promise<void> {
    const { identity, shards, namespace, log } = this.options;
    const startedAt = Date.now();
    const leases = new Map((await this.list()).map((l) => [l.metadata?.name ?? '', l]));
    for (const [name, lease] of leases) this.observe(name, lease);

    // Membership: our own Lease renewed, lapsed ones of replicas that died removed.
    const memberName = memberLeaseName(identity);
    await this.claim(memberName, leases.get(memberName), 'member');
    const members = new Set([identity]);
    for (const [name, lease] of leases) {
      if (!name.startsWith(MEMBER_PREFIX) || name === memberName) continue;
      if (this.lapsed(name, lease)) await this.remove(lease);
      else members.add(lease.spec?.holderIdentity ?? name);
    }
    const fair = Math.ceil(shards / members.size);

    const mine: number[] = [];
    const free: number[] = [];
    for (let s = 0; s < shards; s++) {
      const name = SHARD_PREFIX + s;
      const lease = leases.get(name);
      const holder = lease?.spec?.holderIdentity ?? '';
      if (holder === identity) mine.push(s);
      else if (!lease || holder === '' || this.lapsed(name, lease)) free.push(s);
      else this.held.delete(s);
    }
    // More than our share while others exist: hand the extra back (the highest first).
    while (mine.length > fair) {
      const s = mine.pop() as number;
      this.held.delete(s);
      await this.write(leases.get(SHARD_PREFIX + s) as V1Lease, '').catch(() => undefined);
      log.info({ shard: s, members: members.size }, 'handed a monitoring shard back');
    }
    for (const s of mine) {
      if (await this.claim(SHARD_PREFIX + s, leases.get(SHARD_PREFIX + s), 'shard'))
        this.held.set(s, startedAt);
      else this.held.delete(s);
    }
    for (const s of free) {
      if (mine.length >= fair) break;
      if (await this.claim(SHARD_PREFIX + s, leases.get(SHARD_PREFIX + s), 'shard')) {
        this.held.set(s, startedAt);
        mine.push(s);
        log.info({ shard: s, namespace }, 'monitoring shard acquired');
      }
    }
  }

  /** Creates or renews a Lease as ours; false if another replica won the race. */
  private async claim(name: string, lease: V1Lease | undefined, role: string): Promise<boolean> {
    try {
      if (lease) await this.write(lease, this.options.identity);
      else {
        const now = new V1MicroTime();
        await this.api.createNamespacedLease({
          namespace: this.options.namespace,
          body: {
            metadata: { name, namespace: this.options.namespace, labels: { [SHARD_LABEL]: role } },
            spec: {
              holderIdentity: this.options.identity,
              leaseDurationSeconds: Math.ceil(this.leaseDurationMs / 1000),
              acquireTime: now,
              renewTime: now,
            },
          },
        });
      }
      return true;
    } catch (err) {
      if (err instanceof ApiException && (err.code === 409 || err.code === 404)) return false;
      throw err;
    }
  }

  /** Replaces the Lease, conditioned on the version we read, with `holder` ('' releases it). */
  private async write(lease: V1Lease, holder: string): Promise<void> {
    const now = new V1MicroTime();
    const taking = lease.spec?.holderIdentity !== holder;
    await this.api.replaceNamespacedLease({
      name: lease.metadata?.name ?? '',
      namespace: this.options.namespace,
      body: {
        ...lease,
        spec: {
          ...lease.spec,
          holderIdentity: holder,
          leaseDurationSeconds: holder ? Math.ceil(this.leaseDurationMs / 1000) : 1,
          renewTime: now,
          ...(taking ? { acquireTime: now } : {}),
        },
      },
    });
  }

  private async remove(lease: V1Lease): Promise<void> {
    await this.api
      .deleteNamespacedLease({
        name: lease.metadata?.name ?? '',
        namespace: this.options.namespace,
        body: { preconditions: { resourceVersion: lease.metadata?.resourceVersion } },
      })
      .catch(() => undefined);
  }

  private observe(name: string, lease: V1Lease): void {
    const rv = lease.metadata?.resourceVersion ?? '';
    if (this.observed.get(name)?.resourceVersion !== rv)
      this.observed.set(name, { resourceVersion: rv, at: Date.now() });
  }

  private lapsed(name: string, lease: V1Lease): boolean {
    const seen = this.observed.get(name);
    const duration = (lease.spec?.leaseDurationSeconds ?? 0) * 1000;
    return !seen || Date.now() - seen.at > duration;
  }
}
