// The names the operator, the agents and the mediator agree on when the operator manages
// certificates in a cluster: the signers they ask, and where the CA and its public bundle live
// (the operator's namespace).
export const AGENT_SIGNER = 'lockstep.dev/agent';
export const MEDIATOR_SIGNER = 'lockstep.dev/mediator';
/** A kubernetes.io/tls Secret: the CA's certificate and key; only the operator reads it. */
export const CA_SECRET = 'lockstep-ca';
/** A ConfigMap whose `ca.crt` is what every component trusts; anyone may read it. */
export const CA_BUNDLE_CONFIGMAP = 'lockstep-ca';
export const CA_BUNDLE_KEY = 'ca.crt';
/** The ServiceAccount of the agents' DaemonSet (deploy/rbac/agent.yaml). */
export const AGENT_SERVICE_ACCOUNT = 'lockstep-agent';
/** The mediator's ServiceAccount (deploy/rbac/mediator.yaml), and the name in its certificate. */
export const MEDIATOR_SERVICE_ACCOUNT = 'lockstep-mediator';
export const MEDIATOR_NAME = 'lockstep-mediator';
/** The pod whose own token made a request, as the apiserver records it in the request. */
export const POD_NAME_EXTRA = 'authentication.kubernetes.io/pod-name';
export const POD_UID_EXTRA = 'authentication.kubernetes.io/pod-uid';
export const NODE_NAME_EXTRA = 'authentication.kubernetes.io/node-name';

/**
 * When a certificate just received is renewed: once two thirds of its remaining life are gone,
 * leaving a third to retry in if the issuer is away.
 */
export function renewalDelay(notAfter: Date, now = Date.now()): number {
  return Math.max(1_000, ((notAfter.getTime() - now) * 2) / 3);
}
