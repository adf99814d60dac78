// Watches the agents the way informers watch the apiserver: it polls each registered agent's
// status (a cheap local gRPC call, not an API write) and reports the volumes whose replication
// state changed, so reconcilers wake up when a peer drops or catches up, and stay idle
// otherwise. Progress counters (bytes done, ETA) are not part of the fingerprint: they change
// continuously and are read by the reconcile itself while something is in motion.
import { errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import type { VolumeInfo } from '../../../lib/agent-client';
import type { AgentPool } from './agent-pool';

export interface WatchedAgent {
  node: string;
  endpoint: string;
}

export interface AgentWatcherOptions {
  pool: AgentPool;
  /** The agents to watch right now (e.g. from the LockstepNode informer). */
  agents: () => WatchedAgent[];
  /** A volume's state changed on a node, or the node became (un)reachable (volume ''). */
  onChange: (node: string, volume: string) => void;
  intervalMs?: number;
  log: Logger;
}

function fingerprint(v: VolumeInfo): string {
  const r = v.replication;
  return JSON.stringify([
    v.state,
    v.role,
    r?.mode,
    r?.primaryConnected,
    (r?.peers ?? []).map((p) => [p.address, p.state, p.dirtyBytes > 0, p.reason]),
  ]);
}

export class AgentWatcher {
  private readonly seen = new Map<string, Map<string, string>>();
  private readonly reachable = new Map<string, boolean>();
  private readonly polling = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(private readonly opts: AgentWatcherOptions) {}

  start(): void {
    this.poll();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private poll(): void {
    const agents = this.opts.agents();
    // Each agent on its own: one that does not answer (its deadline runs) must not delay
    // noticing a change on the others.
    for (const a of agents) {
      if (this.polling.has(a.node)) continue;
      this.polling.add(a.node);
      void this.pollOne(a).finally(() => this.polling.delete(a.node));
    }
    const current = new Set(agents.map((a) => a.node));
    for (const node of this.seen.keys()) if (!current.has(node)) this.seen.delete(node);
    if (!this.stopped) {
      this.timer = setTimeout(() => this.poll(), this.opts.intervalMs ?? 1_000);
      this.timer.unref();
    }
  }

  private async pollOne({ node, endpoint }: WatchedAgent): Promise<void> {
    let volumes: VolumeInfo[];
    try {
      volumes = await this.opts.pool.get(endpoint).listVolumes();
    } catch (err) {
      if (this.reachable.get(node) !== false) {
        this.opts.log.warn({ node, endpoint, err: errorMessage(err) }, 'agent unreachable');
        this.reachable.set(node, false);
        this.opts.onChange(node, '');
      }
      return;
    }
    if (this.reachable.get(node) !== true) {
      this.reachable.set(node, true);
      this.opts.onChange(node, '');
    }
    const before = this.seen.get(node) ?? new Map<string, string>();
    const after = new Map(volumes.map((v) => [v.name, fingerprint(v)]));
    for (const [name, fp] of after) if (before.get(name) !== fp) this.opts.onChange(node, name);
    for (const name of before.keys()) if (!after.has(name)) this.opts.onChange(node, name);
    this.seen.set(node, after);
  }
}
