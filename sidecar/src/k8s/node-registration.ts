// An agent's presence in the cluster, as kubelets do it: a LockstepNode object (endpoint,
// version, capacity) written when it changes, and a coordination Lease of the same name whose
// renewals are the heartbeat, so that at rest the agent's only API writes are lease renewals.
import { statfs } from 'node:fs/promises';
import { GROUP, VERSION } from '../../../lib/api-group';
import { errorMessage } from '../../../lib/errors';
import {
  isConflict,
  isNotFound,
  type KubeClient,
  type ObjectMeta,
} from '../../../lib/kube-rest/client';
import type { Logger } from '../../../lib/logger';

export interface NodeRegistrationOptions {
  kube: KubeClient;
  node: string;
  /** Namespace of the heartbeat Lease (the operator's namespace). */
  namespace: string;
  endpoint: string;
  version: string;
  dataDir: string;
  log: Logger;
  /** The operator declares the node not Ready once the lease is this old. */
  leaseDurationSeconds?: number;
}

/** What the agent says of itself in its LockstepNode (operator/src/api/types.ts has it all). */
interface LockstepNodeSpec {
  endpoint: string;
  version: string;
  capacityBytes: number;
}

interface LockstepNode {
  apiVersion: string;
  kind: 'LockstepNode';
  metadata: ObjectMeta;
  spec: LockstepNodeSpec;
}

/** A coordination.k8s.io/v1 Lease, the fields the heartbeat uses. */
interface Lease {
  apiVersion: 'coordination.k8s.io/v1';
  kind: 'Lease';
  metadata: ObjectMeta;
  spec: {
    holderIdentity?: string;
    leaseDurationSeconds?: number;
    acquireTime?: string;
    renewTime?: string;
  };
}

const RETRY_MS = 2_000;

export class NodeRegistration {
  private timer: NodeJS.Timeout | undefined;
  private lease: Lease | undefined;
  private ownerUid = '';
  private stopped = false;

  constructor(private readonly opts: NodeRegistrationOptions) {}

  get leaseDurationSeconds(): number {
    return this.opts.leaseDurationSeconds ?? 40;
  }

  /** Registers and starts heartbeating; failures are retried in the background, never fatal. */
  start(): void {
    void this.beat();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private async beat(): Promise<void> {
    let next = (this.leaseDurationSeconds * 1000) / 4;
    try {
      if (!this.ownerUid) await this.register();
      await this.renew();
    } catch (err) {
      this.opts.log.warn({ err: errorMessage(err) }, 'node registration or heartbeat failed');
      next = RETRY_MS;
    }
    if (!this.stopped) this.timer = setTimeout(() => void this.beat(), next).unref();
  }

  private async register(): Promise<void> {
    const { kube, node, endpoint, version, dataDir } = this.opts;
    const fs = await statfs(dataDir);
    const spec: LockstepNodeSpec = { endpoint, version, capacityBytes: fs.bavail * fs.bsize };
    const collection = `/apis/${GROUP}/${VERSION}/lockstepnodes`;
    const path = `${collection}/${encodeURIComponent(node)}`;
    let current: LockstepNode;
    try {
      current = await kube.get<LockstepNode>(path);
    } catch (err) {
      if (!isNotFound(err)) throw err;
      current = await kube.create<LockstepNode>(collection, {
        apiVersion: `${GROUP}/${VERSION}`,
        kind: 'LockstepNode',
        metadata: { name: node },
        spec,
      });
      this.opts.log.info({ node, endpoint }, 'registered LockstepNode');
    }
    // Capacity is reported at start only: tracking it live would be a write per change.
    if (current.spec.endpoint !== endpoint || current.spec.version !== version) {
      current = await kube.mergePatch<LockstepNode>(path, { spec });
      this.opts.log.info({ node, endpoint, version }, 'updated LockstepNode');
    }
    this.ownerUid = current.metadata.uid ?? '';
  }

  private async renew(): Promise<void> {
    const { kube, node, namespace } = this.opts;
    const collection = `/apis/coordination.k8s.io/v1/namespaces/${encodeURIComponent(namespace)}/leases`;
    const path = `${collection}/${encodeURIComponent(node)}`;
    const now = microTime(new Date());
    if (!this.lease) {
      try {
        this.lease = await kube.get<Lease>(path);
      } catch (err) {
        if (!isNotFound(err)) throw err;
        this.lease = await kube.create<Lease>(collection, {
          apiVersion: 'coordination.k8s.io/v1',
          kind: 'Lease',
          metadata: {
            name: node,
            namespace,
            // Deleting the LockstepNode garbage-collects its heartbeat.
            ownerReferences: [
              {
                apiVersion: `${GROUP}/${VERSION}`,
                kind: 'LockstepNode',
                name: node,
                uid: this.ownerUid,
              },
            ],
          },
          spec: {
            holderIdentity: node,
            leaseDurationSeconds: this.leaseDurationSeconds,
            acquireTime: now,
            renewTime: now,
          },
        });
        return;
      }
    }
    const body: Lease = {
      ...this.lease,
      spec: {
        ...this.lease.spec,
        holderIdentity: node,
        leaseDurationSeconds: this.leaseDurationSeconds,
        renewTime: now,
      },
    };
    try {
      this.lease = await kube.replace<Lease>(path, body);
    } catch (err) {
      // Someone else changed it (or deleted it): read it afresh next time.
      if (isConflict(err) || isNotFound(err)) this.lease = undefined;
      throw err;
    }
  }
}

/** A Lease's times are MicroTime: RFC 3339 with exactly six fractional digits. */
function microTime(t: Date): string {
  return t.toISOString().replace(/Z$/, '000Z');
}
