// Certificates the operator manages, on control planes of this file's own (the shared one has
// a CA of the test's making): the operator makes the CA Secret, each agent asks for its own
// node's certificate with its pod's bound token and gets nothing else, a relationship reaches
// InSync over mutual TLS, and short-lived certificates are renewed under running replication
// without a link dropped. Then a second cluster, with its own operator and CA, takes a replica
// from the first through a target's endpoint and tlsSecretRef.
import { X509Certificate } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import {
  createAuthority,
  createCertificateRequest,
  issueCertificate,
} from '../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../lib/tls/tls-dir';
import { identityOfSubject } from '../../lib/tls/identity';
import { openTransport, type Transport } from '../../lib/tls/transport';
import { AgentClient } from '../../lib/agent-client';
import { fioVerify, lockstepBin, type AgentProcess } from '../harness/agent-process';
import { productNode } from '../harness/product-runtime';
import {
  NAMESPACE,
  OperatorProcess,
  agentPod,
  apply,
  clusterAgent,
  installLockstep,
  localPv,
  nodeDisk,
  oneVolumeGroup,
  pvc,
  removeDir,
  serviceAccountKubeconfig,
  syncRelationship,
} from '../harness/cluster';
import { kubectl, startControlPlane, type ControlPlane } from '../harness/control-plane';
import { MediatorProcess } from '../harness/mediator-process';
import { waitFor } from '../harness/processes';
import { dataFile, expectSameImages, inSync, peerOf, waitPeer } from '../harness/replication';

const MiB = 1024 * 1024;
const execFileAsync = promisify(execFile);

async function cli(...args: string[]): Promise<string> {
  return (await execFileAsync(productNode(), [lockstepBin, ...args])).stdout;
}
const NS = 'app';
/** Short enough that renewals happen while the test runs (each at two thirds of it). */
const LIFETIME_S = 24;

describe('certificates managed by the operator, on a real control plane', () => {
  let cp: ControlPlane;
  let west: ControlPlane | undefined;
  let westOperator: OperatorProcess | undefined;
  let root: string;
  let operator: OperatorProcess;
  let admin: Transport | undefined;
  const agents: AgentProcess[] = [];
  const mediators: MediatorProcess[] = [];
  let a: AgentProcess;
  let b: AgentProcess;

  const kc = (...args: string[]) => kubectl(cp.kubeconfig, args);
  const json = <T>(...args: string[]): T => JSON.parse(kc('get', ...args, '-o', 'json')) as T;
  const secretField = (name: string, key: string, cluster = cp) =>
    Buffer.from(
      (
        JSON.parse(
          kubectl(cluster.kubeconfig, ['get', 'secret', name, '-n', NAMESPACE, '-o', 'json']),
        ) as { data: Record<string, string> }
      ).data[key] ?? '',
      'base64',
    ).toString();
  const phaseOf = (name: string) =>
    json<{ status?: { phase?: string } }>('lsr', name, '-n', NS).status?.phase;

  /**
   * An agent for `node`, its token bound to a pod on `podNode` (its own node unless a test
   * lies), in the first cluster unless told; the test reaches it as `asAdmin`.
   */
  function agent(
    node: string,
    {
      podNode = node,
      cluster = cp,
      asAdmin = () => admin,
    }: { podNode?: string; cluster?: ControlPlane; asAdmin?: () => Transport | undefined } = {},
  ): AgentProcess {
    const pod = agentPod(podNode, cluster.kubeconfig);
    const token = serviceAccountKubeconfig(root, 'lockstep-agent', {
      kubeconfig: cluster.kubeconfig,
      pod,
    });
    const tlsDir = path.join(root, podNode === node ? `tls-${node}` : `tls-${node}-on-${podNode}`);
    const p = clusterAgent(node, token, {
      tls: {
        args: ['--request-certificate', '--tls-dir', tlsDir],
        admin: () => {
          const t = asAdmin();
          if (!t) throw new Error('no administrator certificate yet');
          return t;
        },
      },
    });
    agents.push(p);
    return p;
  }
  const tlsCert = (node: string) =>
    new X509Certificate(readFileSync(path.join(root, `tls-${node}`, 'tls.crt')));

  /**
   * A ConsistencyGroup `group` of one volume, on a local PV of node-a, and its SyncRelationship
   * `<group>-sync` to `target`; returns the PV's directory.
   */
  function replicatedGroup(group: string, size: string, target: object): string {
    const disk = nodeDisk(root, 'node-a', `pv-${group}`);
    apply(localPv(`pv-${group}`, 'node-a', disk, size), cp.kubeconfig);
    apply(pvc(group, NS, `pv-${group}`, size), cp.kubeconfig);
    apply(oneVolumeGroup(group, NS, group), cp.kubeconfig);
    apply(
      syncRelationship(`${group}-sync`, NS, group, 'node-a', [], { targets: [target] }),
      cp.kubeconfig,
    );
    return disk;
  }

  beforeAll(async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-certs-'));
    cp = await startControlPlane({ controllers: ['persistentvolume-binder'] });
    installLockstep(cp.kubeconfig);
    const operatorKc = serviceAccountKubeconfig(root, 'lockstep-operator', {
      kubeconfig: cp.kubeconfig,
    });
    operator = new OperatorProcess('operator', operatorKc, { lifetime: `${LIFETIME_S}s` });
    await operator.start();
    await operator.leading();
  });

  afterAll(async () => {
    for (const p of [...agents, ...mediators]) await p.dispose();
    await operator?.dispose();
    await westOperator?.dispose();
    await cp?.stop();
    await west?.stop();
    if (root) removeDir(root);
  });

  it('makes the CA Secret, publishes its bundle, and issues its own certificate from it', async () => {
    const secret = json<{ type: string }>('secret', 'lockstep-ca', '-n', NAMESPACE);
    expect(secret.type).toBe('kubernetes.io/tls');
    const ca = new X509Certificate(secretField('lockstep-ca', 'tls.crt'));
    expect(ca.ca).toBe(true);
    const bundle = json<{ data: Record<string, string> }>(
      'configmap',
      'lockstep-ca',
      '-n',
      NAMESPACE,
    );
    expect(bundle.data['ca.crt']).toBe(secretField('lockstep-ca', 'tls.crt'));
    const own = new X509Certificate(readFileSync(path.join(operator.tlsDir, 'tls.crt')));
    expect(own.checkIssued(ca) && own.verify(ca.publicKey)).toBe(true);
    expect(identityOfSubject(own.subject)).toEqual({ role: 'operator', name: 'lockstep-operator' });

    // An administrator gets a certificate the way a user would: from the CA in the Secret.
    const adminDir = path.join(root, 'admin');
    const authority = {
      certPem: secretField('lockstep-ca', 'tls.crt'),
      keyPem: secretField('lockstep-ca', 'tls.key'),
    };
    await writeTlsDir(
      adminDir,
      authority.certPem,
      await issueCertificate(authority, { role: 'admin', name: 'admin' }, { validMs: 3_600_000 }),
    );
    admin = await openTransport({ tlsDir: adminDir }, pino({ level: 'silent' }));
  });

  it('gives each agent a certificate for its own node only, asked for with its pod’s token', async () => {
    a = await agent('node-a').start();
    b = await agent('node-b').start();
    const ca = new X509Certificate(secretField('lockstep-ca', 'tls.crt'));
    for (const node of ['node-a', 'node-b']) {
      const cert = tlsCert(node);
      expect(identityOfSubject(cert.subject)).toEqual({ role: 'agent', name: node });
      expect(cert.verify(ca.publicKey)).toBe(true);
      expect(cert.subjectAltName).toContain(`DNS:${node}`);
      const lifetime = Date.parse(cert.validTo) - Date.parse(cert.validFrom);
      // Short-lived: the operator's lifetime, plus the 5 minutes it backdates for clock skew.
      expect(lifetime).toBeLessThanOrEqual((LIFETIME_S + 300) * 1000);
    }
    const csrs = json<{
      items: Array<{
        spec: { username: string; signerName: string };
        status: { conditions: Array<{ type: string }> };
      }>;
    }>('csr');
    const ours = csrs.items.filter((c) => c.spec.signerName === 'lockstep.dev/agent');
    expect(ours.length).toBeGreaterThanOrEqual(2);
    for (const c of ours) {
      expect(c.spec.username).toBe(`system:serviceaccount:${NAMESPACE}:lockstep-agent`);
      expect(c.status.conditions.map((x) => x.type)).toContain('Approved');
    }
  });

  it('gives the mediator its certificate, asked for with its pod’s token', async () => {
    const pod = 'lockstep-mediator-0';
    apply(
      {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: pod, namespace: NAMESPACE },
        spec: {
          nodeName: 'node-c',
          serviceAccountName: 'lockstep-mediator',
          containers: [{ name: 'mediator', image: 'lockstep:test' }],
        },
      },
      cp.kubeconfig,
    );
    const token = serviceAccountKubeconfig(root, 'lockstep-mediator', {
      kubeconfig: cp.kubeconfig,
      pod,
    });
    const tlsDir = path.join(root, 'tls-mediator');
    const mediator = new MediatorProcess('', '127.0.0.1', {
      args: [
        '--request-certificate',
        '--kubeconfig',
        token,
        '--namespace',
        NAMESPACE,
        '--tls-dir',
        tlsDir,
      ],
      admin: () => {
        if (!admin) throw new Error('no administrator certificate yet');
        return admin;
      },
    });
    mediators.push(mediator);
    await mediator.start();
    const cert = new X509Certificate(readFileSync(path.join(tlsDir, 'tls.crt')));
    expect(identityOfSubject(cert.subject)).toEqual({
      role: 'mediator',
      name: 'lockstep-mediator',
    });
    expect(cert.verify(new X509Certificate(secretField('lockstep-ca', 'tls.crt')).publicKey)).toBe(
      true,
    );
    expect(cert.subjectAltName).toContain(`DNS:lockstep-mediator.${NAMESPACE}.svc`);
    // An agent's pod cannot have it: its token is not the mediator's ServiceAccount.
    const agentToken = serviceAccountKubeconfig(root, 'lockstep-agent', {
      kubeconfig: cp.kubeconfig,
      pod: agentPod('node-c', cp.kubeconfig),
    });
    const impostor = new MediatorProcess('', '127.0.0.1', {
      args: [
        '--request-certificate',
        '--kubeconfig',
        agentToken,
        '--namespace',
        NAMESPACE,
        '--tls-dir',
        path.join(root, 'tls-impostor'),
      ],
      admin: () => admin as Transport,
    });
    mediators.push(impostor);
    const refused = await impostor.startRefused();
    expect(refused.code).toBe(1);
    expect(refused.log).toMatch(
      /denied: requested by system:serviceaccount:lockstep-system:lockstep-agent, not by the ServiceAccount system:serviceaccount:lockstep-system:lockstep-mediator that lockstep.dev\/mediator serves/,
    );
  });

  it('refuses an agent that asks for another node’s certificate: it does not start, and says why', async () => {
    const liar = agent('node-b', { podNode: 'node-c' });
    await expect(liar.start()).rejects.toThrow(
      /certificate request lockstep-agent-node-b-\w+ denied: asks for \\?"CN=node-b, O=lockstep:agent\\?", but pod lockstep-agent-node-c runs on node node-c/,
    );
    expect(await operator.scrape()).toMatch(
      /lockstep_operator_certificate_requests_total\{result="denied"\} [1-9]/,
    );
  });

  it('refuses a request not made with an agent pod’s token', async () => {
    const { requestPem } = await createCertificateRequest({ role: 'agent', name: 'node-a' });
    const name = 'stranger-asks-for-node-a';
    apply(
      {
        apiVersion: 'certificates.k8s.io/v1',
        kind: 'CertificateSigningRequest',
        metadata: { name },
        spec: {
          request: Buffer.from(requestPem).toString('base64'),
          signerName: 'lockstep.dev/agent',
          usages: ['digital signature', 'client auth', 'server auth'],
        },
      },
      cp.kubeconfig,
    );
    const denied = await waitFor(
      'the stranger’s request answered',
      () => {
        const c = json<{
          status?: { conditions?: Array<{ type: string; message: string }>; certificate?: string };
        }>('csr', name);
        return Promise.resolve(c.status?.conditions?.[0]);
      },
      20_000,
      200,
    );
    expect(denied.type).toBe('Denied');
    expect(denied.message).toMatch(
      /not by the ServiceAccount .*:lockstep-agent that lockstep.dev\/agent serves/,
    );
  });

  it('says in the relationship’s status why an agent it cannot reach refuses its certificate', async () => {
    // An agent registered in this cluster whose certificate comes from another CA.
    const strangerCa = await createAuthority('stranger CA');
    const dir = (name: string) => path.join(root, `stranger-${name}`);
    await writeTlsDir(
      dir('agent'),
      strangerCa.certPem,
      await issueCertificate(strangerCa, { role: 'agent', name: 'node-x' }, { validMs: 3_600_000 }),
    );
    await writeTlsDir(
      dir('admin'),
      strangerCa.certPem,
      await issueCertificate(strangerCa, { role: 'admin', name: 'admin' }, { validMs: 3_600_000 }),
    );
    const strangerAdmin = await openTransport({ tlsDir: dir('admin') }, pino({ level: 'silent' }));
    const pod = agentPod('node-x', cp.kubeconfig);
    const x = clusterAgent(
      'node-x',
      serviceAccountKubeconfig(root, 'lockstep-agent', { kubeconfig: cp.kubeconfig, pod }),
      { tls: { args: ['--tls-dir', dir('agent')], admin: () => strangerAdmin } },
    );
    agents.push(x);
    await x.start();
    kc('create', 'namespace', 'elsewhere');
    const disk = nodeDisk(root, 'node-x', 'pv-x');
    apply(localPv('pv-x', 'node-x', disk, '16Mi'), cp.kubeconfig);
    apply(pvc('x', 'elsewhere', 'pv-x', '16Mi'), cp.kubeconfig);
    apply(oneVolumeGroup('x', 'elsewhere', 'x'), cp.kubeconfig);
    apply(syncRelationship('x-sync', 'elsewhere', 'x', 'node-x', ['node-a']), cp.kubeconfig);
    const ready = await waitFor(
      'x-sync to say why node-x is unreachable',
      () => {
        const r = JSON.parse(
          kubectl(cp.kubeconfig, ['get', 'lsr', 'x-sync', '-n', 'elsewhere', '-o', 'json']),
        ) as { status?: { conditions?: Array<{ type: string; reason: string; message: string }> } };
        return Promise.resolve(
          r.status?.conditions?.find(
            (c) => c.type === 'Ready' && c.reason === 'PrimaryUnreachable',
          ),
        );
      },
      30_000,
      200,
    );
    expect(ready.message).toMatch(
      new RegExp(
        `the agent at ${x.grpcAddress} refuses us: TLS handshake refused: its certificate is not from the CA`,
      ),
    );
    if (strangerAdmin.secure) strangerAdmin.dir.close();
    kc('delete', 'lsr', 'x-sync', '-n', 'elsewhere', '--wait=false');
  });

  it('replicates over mutual TLS with them, and renews them before they expire without dropping the link', async () => {
    kc('create', 'namespace', NS);
    const disk = replicatedGroup('db', '32Mi', { node: 'node-b' });
    const patterned = Buffer.alloc(32 * MiB);
    for (let i = 0; i < 8 * MiB; i += 4) patterned.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(path.join(disk, 'disk.img'), patterned);
    const volume = `${NS}.db.data`;
    await waitFor(
      'db-sync InSync',
      () => Promise.resolve(phaseOf('db-sync') === 'InSync' || undefined),
      60_000,
      200,
    );
    await waitPeer(a, volume, b, inSync, 'in sync');
    const failures = (await peerOf(a, volume, b)).linkFailures;

    // Two renewals of every certificate while verified writes run.
    const first = { a: tlsCert('node-a').fingerprint256, b: tlsCert('node-b').fingerprint256 };
    const ownFirst = new X509Certificate(readFileSync(path.join(operator.tlsDir, 'tls.crt')))
      .fingerprint256;
    const firstValidTo = Date.parse(tlsCert('node-a').validTo);
    const seen = { a: new Set([first.a]), b: new Set([first.b]) };
    const writes = (async () => {
      for (let i = 0; i < 6; i++) await fioVerify(a.uri(volume), '8M', ['--rate_iops=500']);
    })();
    await waitFor(
      'two renewals of each agent’s certificate',
      () => {
        seen.a.add(tlsCert('node-a').fingerprint256);
        seen.b.add(tlsCert('node-b').fingerprint256);
        return Promise.resolve((seen.a.size >= 3 && seen.b.size >= 3) || undefined);
      },
      LIFETIME_S * 3 * 1000,
      500,
    );
    await writes;
    expect(
      new X509Certificate(readFileSync(path.join(operator.tlsDir, 'tls.crt'))).fingerprint256,
    ).not.toBe(ownFirst);
    // The agents took the renewals up (their expiry moved on) and kept their link.
    const until = /certificate valid until (\S+)/.exec(await a.ctl('status'))?.[1] ?? '';
    expect(Date.parse(until)).toBeGreaterThan(firstValidTo);
    await waitPeer(a, volume, b, inSync, 'in sync after the renewals');
    expect((await peerOf(a, volume, b)).linkFailures).toBe(failures);
    await expectSameImages(path.join(disk, 'disk.img'), dataFile(b, volume));
    // The operator, which dials the agents with its own renewed certificate, still sees them.
    expect(phaseOf('db-sync')).toBe('InSync');
  });

  it('replicates to an agent in another cluster, with its own operator and CA, through endpoint and tlsSecretRef', async () => {
    west = await startControlPlane();
    installLockstep(west.kubeconfig);
    westOperator = new OperatorProcess(
      'west-operator',
      serviceAccountKubeconfig(root, 'lockstep-operator', { kubeconfig: west.kubeconfig }),
      { lifetime: '1h' },
    );
    await westOperator.start();
    await westOperator.leading();
    // The administrators' clients: one certificate per cluster.
    const westCaDir = path.join(root, 'west-ca');
    mkdirSync(westCaDir);
    for (const f of ['tls.crt', 'tls.key'])
      writeFileSync(path.join(westCaDir, f), secretField('lockstep-ca', f, west));
    const westAdmin = path.join(root, 'west-admin');
    await cli('certs', 'issue', '--ca', westCaDir, '--admin', '--out', westAdmin);
    const westTransport = await openTransport({ tlsDir: westAdmin }, pino({ level: 'silent' }));
    const far = await agent('west-b', { cluster: west, asAdmin: () => westTransport }).start();

    const disk = replicatedGroup('dr', '16Mi', {
      endpoint: far.grpcAddress,
      tlsSecretRef: 'west-peer',
    });
    // Without the Secret it waits, and says why.
    const blocked = await waitFor(
      'dr-sync blocked on its Secret',
      () => {
        const r = json<{
          status?: { conditions?: Array<{ type: string; reason: string; message: string }> };
        }>('lsr', 'dr-sync', '-n', NS);
        return Promise.resolve(
          r.status?.conditions?.find((c) => c.type === 'Ready' && c.reason === 'TlsSecretNotFound'),
        );
      },
      30_000,
      200,
    );
    expect(blocked.message).toMatch(/Secret west-peer does not exist/);

    // The west administrator issues a certificate for the east cluster from the west CA; the
    // east administrator keeps it in a Secret.
    const peerDir = path.join(root, 'east-at-west');
    await cli('certs', 'issue', '--ca', westCaDir, '--peer-cluster', 'east', '--out', peerDir);
    kc(
      'create',
      'secret',
      'generic',
      'west-peer',
      '-n',
      NS,
      ...['ca.crt', 'tls.crt', 'tls.key'].map((f) => `--from-file=${path.join(peerDir, f)}`),
    );
    await waitFor(
      'dr-sync InSync',
      () => Promise.resolve(phaseOf('dr-sync') === 'InSync' || undefined),
      60_000,
      200,
    );
    const volume = `${NS}.dr.data`;
    await fioVerify(a.uri(volume), '8M');
    await waitPeer(a, volume, far, inSync, 'in sync across clusters');
    await expectSameImages(path.join(disk, 'disk.img'), dataFile(far, volume));
    // The east primary's link reached the west agent, which answered as itself.
    expect((await peerOf(a, volume, far)).node).toBe('west-b');
    const replica = (await far.client().listVolumes()).find((v) => v.name === volume);
    expect(replica?.role).toBe('secondary');
    // The east agent's own certificate (the east CA) gets nowhere in the west.
    const stranger = await openTransport(
      { tlsDir: path.join(root, 'tls-node-a') },
      pino({ level: 'silent' }),
    );
    const refused = new AgentClient(far.grpcAddress, stranger, 3_000);
    await expect(refused.listVolumes()).rejects.toThrow();
    refused.close();
    if (stranger.secure) stranger.dir.close();
  });
});
