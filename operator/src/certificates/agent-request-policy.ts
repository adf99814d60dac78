// Whom an agent certificate is issued to: the one owner of that rule. A request is granted
// only when it was made with the token of a pod of the agents' ServiceAccount (the apiserver
// records the pod in the request; nobody can write those fields), and only for the node that
// pod runs on. So an agent, or anyone who steals its token, gets a certificate for its own node
// and no other: an agent cannot pose as another node.
import type * as k8s from '@kubernetes/client-node';
import { subjectOf, type Identity } from '../../../lib/tls/identity';
import {
  AGENT_SERVICE_ACCOUNT,
  NODE_NAME_EXTRA,
  POD_NAME_EXTRA,
  POD_UID_EXTRA,
} from '../../../lib/tls/in-cluster';

export type Verdict =
  | { grant: true; identity: Identity; dnsNames: string[]; ips: string[] }
  | { grant: false; reason: string };

export interface RequestFacts {
  csr: k8s.V1CertificateSigningRequest;
  /** The subject the PKCS#10 request asks for, as @peculiar/x509 prints it. */
  requestedSubject: string;
  /** The pod the request names, read from the operator's namespace; undefined if none. */
  pod: k8s.V1Pod | undefined;
  namespace: string;
}

export function requestingPod(csr: k8s.V1CertificateSigningRequest): string | undefined {
  return csr.spec.extra?.[POD_NAME_EXTRA]?.[0];
}

export function judgeAgentRequest(f: RequestFacts): Verdict {
  const { csr, pod, namespace } = f;
  const user = csr.spec.username ?? '';
  const agentUser = `system:serviceaccount:${namespace}:${AGENT_SERVICE_ACCOUNT}`;
  if (user !== agentUser)
    return deny(
      `requested by ${user || 'an unknown user'}, not by the agents’ ServiceAccount ${agentUser}`,
    );
  const podName = requestingPod(csr);
  const podUid = csr.spec.extra?.[POD_UID_EXTRA]?.[0];
  if (!podName || !podUid)
    return deny(
      'not requested with a token bound to a pod (an agent asks with its own pod’s ServiceAccount token)',
    );
  if (!pod) return deny(`pod ${namespace}/${podName}, which requested it, does not exist`);
  if (pod.metadata?.uid !== podUid)
    return deny(
      `pod ${namespace}/${podName} that requested it is gone (its name is now another pod’s)`,
    );
  if ((pod.spec?.serviceAccountName ?? '') !== AGENT_SERVICE_ACCOUNT)
    return deny(`pod ${namespace}/${podName} does not run as ${AGENT_SERVICE_ACCOUNT}`);
  const node = pod.spec?.nodeName;
  if (!node) return deny(`pod ${namespace}/${podName} is not scheduled on a node`);
  const tokenNode = csr.spec.extra?.[NODE_NAME_EXTRA]?.[0];
  if (tokenNode !== undefined && tokenNode !== node)
    return deny(`the token names node ${tokenNode}, but pod ${podName} runs on ${node}`);
  const identity: Identity = { role: 'agent', name: node };
  if (f.requestedSubject !== subjectOf(identity))
    return deny(
      `asks for "${f.requestedSubject}", but pod ${podName} runs on node ${node}: an agent gets "${subjectOf(identity)}"`,
    );
  const ips = [
    ...new Set(
      [pod.status?.hostIP, ...(pod.status?.podIPs ?? []).map((p) => p.ip)].filter(
        (ip): ip is string => !!ip,
      ),
    ),
  ];
  return { grant: true, identity, dnsNames: [node], ips };
}

function deny(reason: string): Verdict {
  return { grant: false, reason };
}
