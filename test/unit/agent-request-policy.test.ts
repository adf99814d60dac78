// Whom the operator's signer gives an agent certificate: the pure rule, case by case. The real
// requests, made with real pod-bound tokens on a real apiserver, are in
// test/k8s/cluster-certificates.test.ts.
import type * as k8s from '@kubernetes/client-node';
import {
  judgeAgentRequest,
  type RequestFacts,
} from '../../operator/src/certificates/agent-request-policy';

const NS = 'lockstep-system';
const AGENT = `system:serviceaccount:${NS}:lockstep-agent`;

function facts(over: {
  username?: string;
  extra?: Record<string, string[]>;
  pod?: k8s.V1Pod | null;
  subject?: string;
}): RequestFacts {
  const pod: k8s.V1Pod = {
    metadata: { name: 'agent-x', uid: 'uid-1' },
    spec: { nodeName: 'node-a', serviceAccountName: 'lockstep-agent', containers: [] },
    status: { hostIP: '10.1.0.5', podIPs: [{ ip: '10.1.0.5' }, { ip: 'fd00::5' }] },
  };
  return {
    csr: {
      spec: {
        request: '',
        signerName: 'lockstep.dev/agent',
        username: over.username ?? AGENT,
        extra: over.extra ?? {
          'authentication.kubernetes.io/pod-name': ['agent-x'],
          'authentication.kubernetes.io/pod-uid': ['uid-1'],
        },
      },
    },
    pod: over.pod === null ? undefined : (over.pod ?? pod),
    requestedSubject: over.subject ?? 'CN=node-a, O=lockstep:agent',
    namespace: NS,
  };
}

const reason = (f: RequestFacts) => {
  const v = judgeAgentRequest(f);
  return v.grant ? 'granted' : v.reason;
};

describe('agent certificate requests', () => {
  it('grants the node its pod runs on, with the pod’s addresses as names', () => {
    expect(judgeAgentRequest(facts({}))).toEqual({
      grant: true,
      identity: { role: 'agent', name: 'node-a' },
      dnsNames: ['node-a'],
      ips: ['10.1.0.5', 'fd00::5'],
    });
  });

  it('refuses another node than the pod’s', () => {
    expect(reason(facts({ subject: 'CN=node-b, O=lockstep:agent' }))).toMatch(
      /asks for "CN=node-b, O=lockstep:agent", but pod agent-x runs on node node-a/,
    );
  });

  it('refuses another role', () => {
    expect(reason(facts({ subject: 'CN=node-a, O=lockstep:admin' }))).toMatch(/asks for/);
  });

  it('refuses another requester than the agents’ ServiceAccount', () => {
    expect(reason(facts({ username: 'system:serviceaccount:default:default' }))).toMatch(
      /requested by system:serviceaccount:default:default, not by the agents’ ServiceAccount/,
    );
  });

  it('refuses a token not bound to a pod', () => {
    expect(reason(facts({ extra: {} }))).toMatch(/not requested with a token bound to a pod/);
  });

  it('refuses when the pod is gone, or replaced under the same name', () => {
    expect(reason(facts({ pod: null }))).toMatch(/does not exist/);
    expect(
      reason(
        facts({
          pod: {
            metadata: { name: 'agent-x', uid: 'uid-2' },
            spec: { nodeName: 'node-a', containers: [] },
          },
        }),
      ),
    ).toMatch(/is gone/);
  });

  it('refuses a pod of another ServiceAccount, or not scheduled', () => {
    expect(
      reason(
        facts({
          pod: {
            metadata: { name: 'agent-x', uid: 'uid-1' },
            spec: { nodeName: 'node-a', serviceAccountName: 'default', containers: [] },
          },
        }),
      ),
    ).toMatch(/does not run as lockstep-agent/);
    expect(
      reason(
        facts({
          pod: {
            metadata: { name: 'agent-x', uid: 'uid-1' },
            spec: { serviceAccountName: 'lockstep-agent', containers: [] },
          },
        }),
      ),
    ).toMatch(/not scheduled on a node/);
  });

  it('refuses when the token’s node is not the pod’s', () => {
    expect(
      reason(
        facts({
          extra: {
            'authentication.kubernetes.io/pod-name': ['agent-x'],
            'authentication.kubernetes.io/pod-uid': ['uid-1'],
            'authentication.kubernetes.io/node-name': ['node-b'],
          },
        }),
      ),
    ).toMatch(/the token names node node-b/);
  });
});
