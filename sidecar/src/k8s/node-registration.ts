// An agent's presence in the cluster, as kubelets do it: a LockstepNode object (endpoint,
// version, capacity) written when it changes, and a coordination Lease of the same name whose
// renewals are the heartbeat, so that at rest the agent's only API writes are lease renewals.
import { statfs } from 'node:fs/promises';
import * as k8s from '@kubernetes/client-node';
import {
  GROUP,
  VERSION,
  apiErrorMessage,
  isConflict,
  isNotFound,
  mergePatch,
} from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';

export interface NodeRegistrationOptions {
  kc: k8s.KubeConfig;
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

const RETRY_MS = 2_000;

export class NodeRegistration {
  private readonly objects: k8s.CustomObjectsApi;
  private readonly leases: k8s.CoordinationV1Api;
  private timer: NodeJS.Timeout | undefined;
  private lease: k8s.V1Lease | undefined;
  private ownerUid = '';
  private stopped = false;

  constructor(private readonly opts: NodeRegistrationOptions) {
    this.objects = opts.kc.makeApiClient(k8s.CustomObjectsApi);
    this.leases = opts.kc.makeApiClient(k8s.CoordinationV1Api);
  }

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
      this.opts.log.warn({ err: apiErrorMessage(err) }, 'node registration or heartbeat failed');
      next = RETRY_MS;
    }
    if (!this.stopped) this.timer = setTimeout(() => void this.beat(), next).unref();
  }

  private async register(): Promise<void> {
    const { node, endpoint, version, dataDir } = this.opts;
    const fs = await statfs(dataDir);
    const spec = { endpoint, version, capacityBytes: fs.bavail * fs.bsize };
    const ref = { group: GROUP, version: VERSION, plural: 'lockstepnodes', name: node };
    let current: { metadata: { uid: string }; spec: typeof spec };
    try {
      current = (await this.objects.getClusterCustomObject(ref)) as typeof current;
    } catch (err) {
      if (!isNotFound(err)) throw err;
      current = (await this.objects.createClusterCustomObject({
        ...ref,
        body: {
          apiVersion: `${GROUP}/${VERSION}`,
          kind: 'LockstepNode',
          metadata: { name: node },
          spec,
        },
      })) as typeof current;
      this.opts.log.info({ node, endpoint }, 'registered LockstepNode');
    }
    // Capacity is reported at start only: tracking it live would be a write per change.
    if (current.spec.endpoint !== endpoint || current.spec.version !== version) {
      current = (await this.objects.patchClusterCustomObject(
        { ...ref, body: { spec } },
        mergePatch,
      )) as typeof current;
      this.opts.log.info({ node, endpoint, version }, 'updated LockstepNode');
    }
    this.ownerUid = current.metadata.uid;
  }

  private async renew(): Promise<void> {
    const { node, namespace } = this.opts;
    const now = new k8s.V1MicroTime();
    if (!this.lease) {
      try {
        this.lease = await this.leases.readNamespacedLease({ name: node, namespace });
      } catch (err) {
        if (!isNotFound(err)) throw err;
        this.lease = await this.leases.createNamespacedLease({
          namespace,
          body: {
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
          },
        });
        return;
      }
    }
    const body: k8s.V1Lease = {
      ...this.lease,
      spec: {
        ...this.lease.spec,
        holderIdentity: node,
        leaseDurationSeconds: this.leaseDurationSeconds,
        renewTime: now,
      },
    };
    try {
      this.lease = await this.leases.replaceNamespacedLease({ name: node, namespace, body });
    } catch (err) {
      // Someone else changed it (or deleted it): read it afresh next time.
      if (isConflict(err) || isNotFound(err)) this.lease = undefined;
      throw err;
    }
  }
}
