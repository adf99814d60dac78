// Whom a certificate is issued to: the one owner of that rule. A request is granted only when
// it was made with the token of a pod of the ServiceAccount its signer serves (the apiserver
// records the pod in the request; nobody can write those fields), and only for the identity
// that pod may hold: an agent's pod gets a certificate for the node it runs on and no other (an
// agent, or anyone who steals its token, cannot pose as another node); the mediator's pod gets
// the mediator's.
import type * as k8s from '@kubernetes/client-node';
import { subjectOf, type Identity } from '../../../lib/tls/identity';
import {
  AGENT_SERVICE_ACCOUNT,
  AGENT_SIGNER,
  MEDIATOR_NAME,
  MEDIATOR_SERVICE_ACCOUNT,
  MEDIATOR_SIGNER,
  NODE_NAME_EXTRA,
  POD_NAME_EXTRA,
  POD_UID_EXTRA,
} from '../../../lib/tls/in-cluster';

export type Verdict =
  | {
      grant: true;
      identity: Identity;
      dnsNames: string[];
      ips: string[];
      /** Why, for the request's Approved condition. */
      because: string;
    }
  | { grant: false; reason: string };

export interface RequestFacts {
  csr: k8s.V1CertificateSigningRequest;
  /** The subject the PKCS#10 request asks for, as @peculiar/x509 prints it. */
  requestedSubject: string;
  /** The pod the request names, read from the operator's namespace; undefined if none. */
  pod: k8s.V1Pod | undefined;
  namespace: string;
}

export const SIGNERS = [AGENT_SIGNER, MEDIATOR_SIGNER];

export function requestingPod(csr: k8s.V1CertificateSigningRequest): string | undefined {
  return csr.spec.extra?.[POD_NAME_EXTRA]?.[0];
}

export function judgeRequest(f: RequestFacts): Verdict {
  const signer = f.csr.spec.signerName;
  const account = signer === MEDIATOR_SIGNER ? MEDIATOR_SERVICE_ACCOUNT : AGENT_SERVICE_ACCOUNT;
  const from = requestingPodOf(f, account);
  if ('reason' in from) return deny(from.reason);
  const { pod, podName } = from;
  if (signer === MEDIATOR_SIGNER) {
    const identity: Identity = { role: 'mediator', name: MEDIATOR_NAME };
    const wrongSubject = subjectMismatch(f, identity, `pod ${podName} is the mediator`);
    if (wrongSubject) return deny(wrongSubject);
    const service = MEDIATOR_NAME;
    const dnsNames = [service, `${service}.${f.namespace}`, `${service}.${f.namespace}.svc`];
    return grant(identity, dnsNames, podIps(pod), `pod ${podName} is the mediator`);
  }
  const node = pod.spec?.nodeName;
  if (!node) return deny(`pod ${f.namespace}/${podName} is not scheduled on a node`);
  const tokenNode = f.csr.spec.extra?.[NODE_NAME_EXTRA]?.[0];
  if (tokenNode !== undefined && tokenNode !== node)
    return deny(`the token names node ${tokenNode}, but pod ${podName} runs on ${node}`);
  const identity: Identity = { role: 'agent', name: node };
  const wrongSubject = subjectMismatch(f, identity, `pod ${podName} runs on node ${node}`);
  if (wrongSubject) return deny(wrongSubject);
  return grant(identity, [node], podIps(pod, true), `pod ${podName} runs on node ${node}`);
}

/** The live pod whose own token made the request, if it runs as `account`. */
function requestingPodOf(
  f: RequestFacts,
  account: string,
): { pod: k8s.V1Pod; podName: string } | { reason: string } {
  const { csr, pod, namespace } = f;
  const user = csr.spec.username ?? '';
  const expected = `system:serviceaccount:${namespace}:${account}`;
  if (user !== expected)
    return {
      reason: `requested by ${user || 'an unknown user'}, not by the ServiceAccount ${expected} that ${csr.spec.signerName} serves`,
    };
  const podName = requestingPod(csr);
  const podUid = csr.spec.extra?.[POD_UID_EXTRA]?.[0];
  if (!podName || !podUid)
    return {
      reason: `not requested with a token bound to a pod (a ${account} pod asks with its own ServiceAccount token)`,
    };
  if (!pod) return { reason: `pod ${namespace}/${podName}, which requested it, does not exist` };
  if (pod.metadata?.uid !== podUid)
    return {
      reason: `pod ${namespace}/${podName} that requested it is gone (its name is now another pod’s)`,
    };
  if ((pod.spec?.serviceAccountName ?? '') !== account)
    return { reason: `pod ${namespace}/${podName} does not run as ${account}` };
  return { pod, podName };
}

function subjectMismatch(f: RequestFacts, identity: Identity, why: string): string | undefined {
  const subject = subjectOf(identity);
  return f.requestedSubject === subject
    ? undefined
    : `asks for "${f.requestedSubject}", but ${why}: it gets "${subject}"`;
}

/** The pod's addresses (with its node's, for an agent on the host network). */
function podIps(pod: k8s.V1Pod, withHost = false): string[] {
  const ips = [
    withHost ? pod.status?.hostIP : undefined,
    ...(pod.status?.podIPs ?? []).map((p) => p.ip),
  ];
  return [...new Set(ips.filter((ip): ip is string => !!ip))];
}

function grant(identity: Identity, dnsNames: string[], ips: string[], because: string): Verdict {
  return { grant: true, identity, dnsNames, ips, because };
}

function deny(reason: string): Verdict {
  return { grant: false, reason };
}
