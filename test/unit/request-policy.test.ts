// Whom the operator's signers give a certificate: the pure rule, case by case. The real
// requests, made with real pod-bound tokens on a real apiserver, are in
// test/k8s/cluster-certificates.test.ts.
import type * as k8s from '@kubernetes/client-node';
import { judgeRequest, type RequestFacts } from '../../operator/src/certificates/request-policy';

const NS = 'lockstep-system';
const AGENT = `system:serviceaccount:${NS}:lockstep-agent`;

function facts(over: {
  signer?: string;
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
        signerName: over.signer ?? 'lockstep.dev/agent',
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
  const v = judgeRequest(f);
  return v.grant ? 'granted' : v.reason;
};

describe('agent certificate requests', () => {
  it('grants the node its pod runs on, with the pod’s addresses as names', () => {
    expect(judgeRequest(facts({}))).toEqual({
      grant: true,
      identity: { role: 'agent', name: 'node-a' },
      dnsNames: ['node-a'],
      ips: ['10.1.0.5', 'fd00::5'],
      because: 'pod agent-x runs on node node-a',
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
      /requested by system:serviceaccount:default:default, not by the ServiceAccount system:serviceaccount:lockstep-system:lockstep-agent that lockstep.dev\/agent serves/,
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

describe('mediator certificate requests', () => {
  const MEDIATOR = `system:serviceaccount:${NS}:lockstep-mediator`;
  const mediatorPod: k8s.V1Pod = {
    metadata: { name: 'mediator-x', uid: 'uid-1' },
    spec: { nodeName: 'node-c', serviceAccountName: 'lockstep-mediator', containers: [] },
    status: { hostIP: '10.1.0.7', podIPs: [{ ip: '10.2.0.9' }] },
  };
  const mediator = (over: Parameters<typeof facts>[0] = {}) =>
    facts({
      signer: 'lockstep.dev/mediator',
      username: MEDIATOR,
      pod: mediatorPod,
      subject: 'CN=lockstep-mediator, O=lockstep:mediator',
      extra: {
        'authentication.kubernetes.io/pod-name': ['mediator-x'],
        'authentication.kubernetes.io/pod-uid': ['uid-1'],
      },
      ...over,
    });

  it('grants the mediator’s pod the mediator’s certificate, named as its Service', () => {
    expect(judgeRequest(mediator())).toEqual({
      grant: true,
      identity: { role: 'mediator', name: 'lockstep-mediator' },
      dnsNames: [
        'lockstep-mediator',
        'lockstep-mediator.lockstep-system',
        'lockstep-mediator.lockstep-system.svc',
      ],
      ips: ['10.2.0.9'],
      because: 'pod mediator-x is the mediator',
    });
  });

  it('refuses an agent asking the mediator’s signer, and the mediator asking the agents’', () => {
    expect(reason(mediator({ username: AGENT }))).toMatch(
      /not by the ServiceAccount system:serviceaccount:lockstep-system:lockstep-mediator that lockstep.dev\/mediator serves/,
    );
    expect(reason(mediator({ signer: 'lockstep.dev/agent' }))).toMatch(
      /not by the ServiceAccount .*:lockstep-agent that lockstep.dev\/agent serves/,
    );
  });

  it('refuses any other subject, and a pod of another ServiceAccount', () => {
    expect(reason(mediator({ subject: 'CN=node-c, O=lockstep:agent' }))).toMatch(
      /asks for "CN=node-c, O=lockstep:agent", but pod mediator-x is the mediator/,
    );
    expect(
      reason(
        mediator({
          pod: {
            ...mediatorPod,
            spec: { ...mediatorPod.spec, serviceAccountName: 'lockstep-agent', containers: [] },
          },
        }),
      ),
    ).toMatch(/does not run as lockstep-mediator/);
  });
});
