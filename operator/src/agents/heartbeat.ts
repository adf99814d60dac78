// Whether an agent is alive, judged as the node lifecycle controller judges kubelets: by the
// freshness of the heartbeat Lease it renews. The LockstepNode reconciler reports it, and a
// relationship refuses a side whose agent is not ready.
import type * as k8s from '@kubernetes/client-node';

/** When the node's lease lapses (ms since the epoch), or undefined without a lease. */
export function leaseExpiry(lease: k8s.V1Lease | undefined): number | undefined {
  const renewed = lease?.spec?.renewTime;
  const seconds = lease?.spec?.leaseDurationSeconds;
  if (!renewed || !seconds) return undefined;
  return new Date(renewed).getTime() + seconds * 1000;
}

export function agentReady(lease: k8s.V1Lease | undefined, now: Date): boolean {
  const expiry = leaseExpiry(lease);
  return expiry !== undefined && expiry > now.getTime();
}
