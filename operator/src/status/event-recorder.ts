// Kubernetes Events for transitions, so `kubectl describe` and event exporters show what the
// operator saw and did. Recording is best effort: a failed Event never fails a reconcile.
import { randomBytes } from 'node:crypto';
import * as k8s from '@kubernetes/client-node';
import { apiErrorMessage } from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';

export type EventType = 'Normal' | 'Warning';

export const REPORTING_CONTROLLER = 'lockstep.dev/operator';

export class EventRecorder {
  private readonly core: k8s.CoreV1Api;

  constructor(
    kc: k8s.KubeConfig,
    private readonly instance: string,
    private readonly log: Logger,
  ) {
    this.core = kc.makeApiClient(k8s.CoreV1Api);
  }

  async record(
    obj: k8s.KubernetesObject,
    type: EventType,
    reason: string,
    message: string,
  ): Promise<void> {
    const meta = obj.metadata ?? {};
    const namespace = meta.namespace ?? 'default';
    const now = new Date();
    try {
      await this.core.createNamespacedEvent({
        namespace,
        body: {
          metadata: { name: `${meta.name}.${randomBytes(8).toString('hex')}`, namespace },
          involvedObject: {
            apiVersion: obj.apiVersion,
            kind: obj.kind,
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resourceVersion: meta.resourceVersion,
          },
          type,
          reason,
          message,
          count: 1,
          firstTimestamp: now,
          lastTimestamp: now,
          source: { component: REPORTING_CONTROLLER },
          reportingComponent: REPORTING_CONTROLLER,
          reportingInstance: this.instance,
        },
      });
    } catch (err) {
      this.log.warn({ err: apiErrorMessage(err), reason, object: meta.name }, 'event not recorded');
    }
  }
}
