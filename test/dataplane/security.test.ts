// Mutual TLS and authorization on real agents: strangers, wrong roles and a rogue primary are
// refused, each with its own clear error, and nothing they asked for happens; plaintext and TLS
// do not mix on a data port; certificates rotate under a running workload without breaking a
// link. Certificates come from the test CA (test-certificates.ts) or are made here to be wrong.
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { agentProto, replicationProto } from '../../proto';
import { createAuthority, issueCertificate } from '../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../lib/tls/tls-dir';
import {
  channelCredentials,
  channelOptions,
  openTransport,
  serverCheck,
  type Transport,
} from '../../lib/tls/transport';
import pino from 'pino';
import {
  REPLY_BYTES,
  TOKEN_BYTES,
  decodeReplyHeader,
  encodeHello,
} from '../../sidecar/src/replication/frames';
import { AgentProcess, fioVerify, lockstepBin, run } from '../harness/agent-process';
import { MediatorProcess } from '../harness/mediator-process';
import { waitFor } from '../harness/processes';
import { NBD, RawNbd } from '../harness/raw-nbd';
import { productNode } from '../harness/product-runtime';
import {
  dataFile,
  expectIdentical,
  expectSameImages,
  inSync,
  peerOf,
  volumeStatus,
  waitPeer,
} from '../harness/replication';
import { adminTransport, testCa, tlsDirFor, transportAs } from '../harness/test-certificates';

type Failure = { code: number; details: string };

/** One unary call on a raw client; resolves with the failure (or throws if it succeeded). */
function refusedCall(client: grpc.Client, method: string, request: object): Promise<Failure> {
  type Unary = (
    req: object,
    options: grpc.CallOptions,
    cb: (err: grpc.ServiceError | null) => void,
  ) => void;
  const call = (client as unknown as Record<string, Unary>)[method].bind(client);
  return new Promise((resolve, reject) =>
    call(request, { deadline: Date.now() + 10_000 }, (err) =>
      err
        ? resolve({ code: err.code, details: err.details })
        : reject(new Error(`${method} succeeded`)),
    ),
  );
}

function digest(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

async function scrape(agent: AgentProcess): Promise<string> {
  return (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();
}

function metric(text: string, name: string, labels = ''): number {
  const line = text
    .split('\n')
    .find((l) => l.startsWith(name) && !l.startsWith('#') && l.includes(labels));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Credentials that verify the agent against the test CA and present `cert`/`key` (if any). */
function strangerCredentials(caPem: string, cert?: { certPem: string; keyPem: string }) {
  return grpc.credentials.createSsl(
    Buffer.from(caPem),
    cert ? Buffer.from(cert.keyPem) : null,
    cert ? Buffer.from(cert.certPem) : null,
    { checkServerIdentity: () => undefined },
  );
}

/** A TLS client to a data port holding `tlsDir`'s certificate. */
async function tlsLane(address: string, tlsDir: string): Promise<tls.TLSSocket> {
  const [host, port] = address.split(':');
  const read = (f: string) => readFileSync(path.join(tlsDir, f), 'utf8');
  const socket = tls.connect({
    host,
    port: Number(port),
    ca: read('ca.crt'),
    cert: read('tls.crt'),
    key: read('tls.key'),
    checkServerIdentity: serverCheck(['agent']),
  });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  return socket;
}

/** A hello for volume v with a made-up session token. */
function strangerHello(epoch: number): Buffer {
  const token = randomBytes(TOKEN_BYTES).toString('hex');
  return encodeHello({ lane: 0, keepaliveMs: 1000, token, epoch, volume: 'v' });
}

/** Everything a socket receives until it closes (or `ms` pass). */
function received(socket: net.Socket, ms = 10_000): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const done = (closed: boolean) => {
      clearTimeout(timer);
      resolve({ data: Buffer.concat(chunks), closed });
    };
    const timer = setTimeout(() => done(false), ms);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => undefined);
    socket.once('close', () => done(true));
  });
}

describe('mutual TLS and authorization', () => {
  let a: AgentProcess;
  let b: AgentProcess;
  let uuid = '';
  let caPem = '';
  const clients: grpc.Client[] = [];
  const others: AgentProcess[] = [];

  beforeAll(async () => {
    b = await new AgentProcess({
      node: 'node-b',
      metrics: true,
      extraArgs: ['--peer-timeout', '1500'],
    }).start();
    a = await new AgentProcess({
      node: 'node-a',
      metrics: true,
      extraArgs: ['--peer-timeout', '1500'],
    }).start();
    await a.createVolume('v', '64MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 8m', a.uri('v')]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const c = a.client();
    uuid = (await c.getVolume('v')).uuid;
    c.close();
    caPem = (await testCa()).ca.certPem;
  });

  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });

  afterAll(async () => {
    for (const x of [a, b, ...others]) await x?.dispose();
  });

  /** A replication-service client of `agent`, holding `as`'s certificate. */
  const replicationAs = (agent: AgentProcess, as: Transport) => {
    const c = new (replicationProto().Replication)(
      agent.grpcAddress,
      channelCredentials(as, ['agent']),
      channelOptions(as),
    );
    clients.push(c);
    return c;
  };

  const rawAgent = (agent: AgentProcess, credentials: grpc.ChannelCredentials) => {
    const c = new (agentProto().Agent)(agent.grpcAddress, credentials);
    clients.push(c);
    return c;
  };

  it('refuses a client with no certificate, one from another CA and an expired one, each with its own error; nothing changes', async () => {
    const before = digest(dataFile(a, 'v'));
    const otherCa = await createAuthority('Another CA');
    const fromOtherCa = await issueCertificate(
      otherCa,
      { role: 'admin', name: 'admin' },
      { validMs: 86_400_000 },
    );
    const expired = await issueCertificate(
      (await testCa()).ca,
      { role: 'admin', name: 'admin' },
      { validMs: -60_000 },
    );

    const none = await refusedCall(rawAgent(a, strangerCredentials(caPem)), 'DeleteVolume', {
      name: 'v',
      force: true,
    });
    expect(none.code).toBe(grpc.status.UNAVAILABLE);
    expect(none.details).toMatch(/certificate required/i);

    const stranger = await refusedCall(
      rawAgent(a, strangerCredentials(caPem, fromOtherCa)),
      'DeleteVolume',
      { name: 'v', force: true },
    );
    expect(stranger.code).toBe(grpc.status.UNAVAILABLE);

    const old = await refusedCall(
      rawAgent(a, strangerCredentials(caPem, expired)),
      'DeleteVolume',
      { name: 'v', force: true },
    );
    expect(old.code).toBe(grpc.status.UNAVAILABLE);

    // ctl says which it is: the agent's TLS alert, or what is wrong on our side.
    const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-strangers-'));
    const ctlWith = async (tlsDir: string) =>
      run(productNode(), [
        lockstepBin,
        'ctl',
        '--agent',
        a.grpcAddress,
        '--tls-dir',
        tlsDir,
        'volume',
        'delete',
        'v',
      ]);
    try {
      await writeTlsDir(path.join(dir, 'expired'), caPem, expired);
      await expect(ctlWith(path.join(dir, 'expired'))).rejects.toThrow(
        /tls\.crt expired at .*issue a new one/,
      );
      // Trusts the agent's CA, holds another's certificate.
      await writeTlsDir(path.join(dir, 'other'), `${caPem}\n${otherCa.certPem}`, fromOtherCa);
      await expect(ctlWith(path.join(dir, 'other'))).rejects.toThrow(
        /the agent at .* refuses us: TLS handshake refused: .*it does not accept it \(issued by another CA\?\)/,
      );
      // Trusts only the other CA.
      await writeTlsDir(path.join(dir, 'foreign'), otherCa.certPem, fromOtherCa);
      await expect(ctlWith(path.join(dir, 'foreign'))).rejects.toThrow(
        /refuses us: TLS handshake refused: its certificate is not from the CA in your --tls-dir/,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }

    const c = a.client();
    expect((await c.getVolume('v')).role).toBe('primary');
    c.close();
    expect(digest(dataFile(a, 'v'))).toBe(before);
  });

  it('refuses an agent certificate on the control API with PERMISSION_DENIED naming who and what, and counts it', async () => {
    const before = digest(dataFile(b, 'v'));
    const asNodeB = await transportAs({ role: 'agent', name: 'node-b' });
    const asNodeA = await transportAs({ role: 'agent', name: 'node-a' });
    const refusedBefore = metric(
      await scrape(a),
      'lockstep_access_refused_total',
      'service="control",role="agent"',
    );

    const del = await refusedCall(
      rawAgent(a, channelCredentials(asNodeB, ['agent'])),
      'DeleteVolume',
      { name: 'v', force: true },
    );
    expect(del.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(del.details).toMatch(
      /agent node-b may not call DeleteVolume \(control\): only operators and admins may/,
    );
    const promote = await refusedCall(
      rawAgent(b, channelCredentials(asNodeA, ['agent'])),
      'Promote',
      { name: 'v', force: true },
    );
    expect(promote.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(promote.details).toMatch(/agent node-a may not call Promote/);

    await waitFor(
      'the refusal counted',
      async () =>
        metric(
          await scrape(a),
          'lockstep_access_refused_total',
          'service="control",role="agent"',
        ) ===
          refusedBefore + 1 || undefined,
      5_000,
    );
    expect((await volumeStatus(b, 'v')).role).toBe('secondary');
    expect((await volumeStatus(a, 'v')).role).toBe('primary');
    expect(digest(dataFile(b, 'v'))).toBe(before);
  });

  it('refuses a rogue primary: posing as another node, or any node but the primary, on gRPC and on a data lane', async () => {
    const replicaBefore = digest(dataFile(b, 'v'));
    const rogue = await transportAs({ role: 'agent', name: 'node-c' });
    const rpc = replicationAs(b, rogue);
    const handshake = (primaryNode: string) => ({
      volume: 'v',
      uuid,
      sizeBytes: 64 * 1024 * 1024,
      regionSize: 65536,
      primaryNode,
      primaryAddress: '127.0.0.1:1',
      mode: 'sync',
      epoch: 1_000_000,
    });
    const posing = await refusedCall(rpc, 'Handshake', handshake('node-a'));
    expect(posing.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(posing.details).toMatch(
      /agent node-c may not call Handshake \(replication\): its certificate is node node-c's, and it may not speak for node node-a/,
    );
    // Speaking for itself, with any epoch: it is no node of v's relationship, so the copy is not
    // its to take over (a failover's or a move's new primary is one of them).
    const takeover = await refusedCall(rpc, 'Handshake', handshake('node-c'));
    expect(takeover.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(takeover.details).toMatch(
      /agent node-c may not call Handshake \(replication\): volume v on node node-b replicates from node node-a, and node node-c is not a node of its relationship \(node-a(, node-b)?\)/,
    );
    const members = await refusedCall(rpc, 'SetMembers', {
      volume: 'v',
      uuid,
      members: ['node-c'],
    });
    expect(members.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(members.details).toMatch(/replicates from node node-a, not from node node-c/);
    const snapshot = await refusedCall(rpc, 'TakeSnapshot', {
      volume: 'v',
      uuid,
      name: 'rogue',
      uid: 'x',
    });
    expect(snapshot.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(snapshot.details).toMatch(
      /volume v on node node-b replicates from node node-a, not from node node-c/,
    );

    // A primary takes no primary's calls: dropping its snapshot, say. Nor is it replaced by a
    // node that is not one of its replicas, whatever epoch it claims.
    const toPrimary = replicationAs(a, rogue);
    const primaryBefore = digest(dataFile(a, 'v'));
    const replace = await refusedCall(toPrimary, 'Handshake', handshake('node-c'));
    expect(replace.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(replace.details).toMatch(
      /volume v on node node-a is a primary and node node-c is not one of its replicas \(node-b\)/,
    );
    expect((await volumeStatus(a, 'v')).role).toBe('primary');
    expect(digest(dataFile(a, 'v'))).toBe(primaryBefore);
    const drop = await refusedCall(toPrimary, 'DropSnapshot', { volume: 'v', uuid, name: 'any' });
    expect(drop.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(drop.details).toMatch(
      /volume v on node node-a is a primary: it takes no primary's calls/,
    );

    // The operator is no agent: it may not replicate either.
    const asOperator = await transportAs({ role: 'operator', name: 'lockstep-operator' });
    const opRpc = replicationAs(b, asOperator);
    const operator = await refusedCall(opRpc, 'Handshake', handshake('lockstep-operator'));
    expect(operator.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(operator.details).toMatch(
      /operator lockstep-operator may not call Handshake \(replication\): only agents may/,
    );

    // A data lane with the rogue's certificate and a made-up token: refused before any op.
    const dataAddress = await dataPortOf(b);
    const lane = await tlsLane(dataAddress, await tlsDirFor({ role: 'agent', name: 'node-c' }));
    const answer = received(lane);
    lane.write(strangerHello(1_000_000));
    const { data, closed } = await answer;
    expect(closed).toBe(true);
    const [status, length] = decodeReplyHeader(data);
    expect(status).not.toBe(0);
    expect(data.toString('utf8', REPLY_BYTES, REPLY_BYTES + length)).toMatch(
      /agent node-c may not open a data lane: volume v on node node-b replicates from node node-a, not from node node-c/,
    );

    expect(
      metric(await scrape(b), 'lockstep_access_refused_total', 'service="data-lane",role="agent"'),
    ).toBe(1);
    expect(
      metric(
        await scrape(b),
        'lockstep_access_refused_total',
        'service="replication",role="agent"',
      ),
    ).toBe(4);
    expect(
      metric(
        await scrape(b),
        'lockstep_access_refused_total',
        'service="replication",role="operator"',
      ),
    ).toBe(1);
    expect(digest(dataFile(b, 'v'))).toBe(replicaBefore);
    expect((await peerOf(a, 'v', b)).state).toBe('InSync');
    await expectIdentical(a, b, 'v');
  });

  it('lets a copy created ahead with its relationship’s nodes take its primary only from among them', async () => {
    await a.createVolume('w', '16MiB');
    const client = a.client();
    const wUuid = (await client.getVolume('w')).uuid;
    client.close();
    const created = JSON.parse(
      await b.ctl(
        'volume',
        'create',
        'w',
        '--size',
        '16MiB',
        '--secondary-of',
        wUuid,
        '--members',
        'node-a,node-b',
        '-o',
        'json',
      ),
    ) as { role: string };
    expect(created.role).toBe('secondary');
    await expect(
      b.ctl('volume', 'create', 'x', '--size', '1MiB', '--members', 'node-a'),
    ).rejects.toThrow(/--members lists a secondary’s nodes: it needs --secondary-of/);

    // The first agent to handshake is not its primary unless the list names it.
    const rogue = replicationAs(b, await transportAs({ role: 'agent', name: 'node-c' }));
    const refused = await refusedCall(rogue, 'Handshake', {
      volume: 'w',
      uuid: wUuid,
      sizeBytes: 16 * 1024 * 1024,
      regionSize: 65536,
      primaryNode: 'node-c',
      primaryAddress: '127.0.0.1:1',
      mode: 'sync',
      epoch: 7,
    });
    expect(refused.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(refused.details).toMatch(
      /volume w on node node-b has no primary yet, and node node-c is not a node of its relationship \(node-a, node-b\)/,
    );
    expect((await volumeStatus(b, 'w')).replication).toBeNull();

    // Its own primary is.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 4m', a.uri('w')]);
    await a.ctl('replicate', 'w', '--to', b.grpcAddress);
    await waitPeer(a, 'w', b, inSync, 'in sync');
    await expectIdentical(a, b, 'w');
    await a.ctl('unreplicate', 'w');
    await b.ctl('volume', 'delete', 'w', '--force');
    await a.ctl('volume', 'delete', 'w', '--force');
  });

  it('drops a plaintext client on a TLS data port and a TLS client on a plaintext one, and the other links carry on', async () => {
    const plain = net.connect(Number((await dataPortOf(b)).split(':')[1]), '127.0.0.1');
    const plainAnswer = received(plain);
    plain.write(strangerHello(0));
    const { closed: plainClosed } = await plainAnswer;
    expect(plainClosed).toBe(true);

    // A certificate from another CA: the TLS session is refused before any hello.
    const otherCa = await createAuthority('Another CA');
    const strangerDir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-stranger-'));
    try {
      await writeTlsDir(
        strangerDir,
        `${caPem}\n${otherCa.certPem}`,
        await issueCertificate(otherCa, { role: 'agent', name: 'node-a' }, { validMs: 86_400_000 }),
      );
      const refusedBefore = metric(
        await scrape(b),
        'lockstep_access_refused_total',
        'service="data-lane",role="none"',
      );
      const stranger = await tlsLane(await dataPortOf(b), strangerDir);
      const strangerAnswer = received(stranger);
      stranger.write(strangerHello(0));
      const { data: strangerData, closed: strangerClosed } = await strangerAnswer;
      expect(strangerClosed).toBe(true);
      expect(strangerData.length).toBe(0);
      expect(
        metric(await scrape(b), 'lockstep_access_refused_total', 'service="data-lane",role="none"'),
      ).toBe(refusedBefore + 1);
    } finally {
      rmSync(strangerDir, { recursive: true, force: true });
    }

    // A plaintext pair, on purpose.
    const c = await new AgentProcess({ node: 'node-c', insecure: true, metrics: true }).start();
    others.push(c);
    const d = await new AgentProcess({ node: 'node-d', insecure: true }).start();
    others.push(d);
    await c.createVolume('w', '16MiB');
    await c.ctl('replicate', 'w', '--to', d.grpcAddress);
    await waitPeer(c, 'w', d, inSync, 'in sync');
    await expect(
      tlsLane(await dataPortOf(d), await tlsDirFor({ role: 'agent', name: 'node-a' })),
    ).rejects.toThrow();

    // Both links still carry writes.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 1m 2m', a.uri('v')]);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1m 2m', c.uri('w')]);
    await waitPeer(a, 'v', b, inSync, 'in sync after');
    await waitPeer(c, 'w', d, inSync, 'in sync after');
    await expectIdentical(a, b, 'v');
    await expectIdentical(c, d, 'w');
    expect((await peerOf(a, 'v', b)).linkFailures).toBe(0);

    // Plaintext shows: in status and as a metric.
    expect(await c.ctl('status')).toMatch(/transport: plaintext \(--insecure\)/);
    expect(await a.ctl('status')).toMatch(
      /transport: mutual TLS as agent node-a, certificate valid until/,
    );
    expect(metric(await scrape(c), 'lockstep_tls_enabled')).toBe(0);
    expect(metric(await scrape(a), 'lockstep_tls_enabled')).toBe(1);
  });

  it('takes up rotated certificates while fio verifies through the replicated volume, without reconnecting the lanes', async () => {
    const failuresBefore = (await peerOf(a, 'v', b)).linkFailures;
    const { ca } = await testCa();
    const expiryBefore = metric(
      await scrape(b),
      'lockstep_tls_certificate_expiry_timestamp_seconds',
    );
    // ~5 s of verified writes, so the rotation lands in the middle.
    const fio = fioVerify(a.uri('v'), '48M', ['--rate_iops=2500']);
    await new Promise((r) => setTimeout(r, 1000));
    const renewed = new Map<string, string>();
    for (const node of ['node-a', 'node-b']) {
      const issued = await issueCertificate(
        ca,
        { role: 'agent', name: node },
        { validMs: 2 * 86_400_000 },
      );
      await writeTlsDir(await tlsDirFor({ role: 'agent', name: node }), ca.certPem, issued);
      renewed.set(node, new X509Certificate(issued.certPem).fingerprint256);
    }
    for (const agent of [a, b])
      await waitFor(
        `${agent.node} to take up its new certificate`,
        async () =>
          metric(await scrape(agent), 'lockstep_tls_certificate_expiry_timestamp_seconds') >
            expiryBefore + 3600 || undefined,
        10_000,
      );
    // A new connection is served with the new certificate.
    const probe = await tlsLane(
      await dataPortOf(b),
      await tlsDirFor({ role: 'agent', name: 'probe' }),
    );
    expect(probe.getPeerCertificate().fingerprint256).toBe(renewed.get('node-b'));
    probe.destroy();
    await fio;
    await waitPeer(a, 'v', b, inSync, 'in sync after the rotation');
    expect((await peerOf(a, 'v', b)).linkFailures).toBe(failuresBefore);
    await expectIdentical(a, b, 'v');
  });
});

describe('a peer in another cluster, under its own CA', () => {
  const agents: AgentProcess[] = [];
  let root = '';
  afterAll(async () => {
    for (const p of agents) await p.dispose();
    rmSync(root, { recursive: true, force: true });
  });

  it('is reached with credentials its CA issued: bad ones refused, good ones kept across a restart', async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-far-'));
    const farCa = await createAuthority('far cluster CA');
    const issueTo = async (dir: string, id: { role: 'agent' | 'admin'; name: string }) => {
      await writeTlsDir(
        dir,
        farCa.certPem,
        await issueCertificate(farCa, id, { validMs: 3_600_000 }),
      );
      return dir;
    };
    const farAdmin = await openTransport(
      { tlsDir: await issueTo(path.join(root, 'admin'), { role: 'admin', name: 'admin' }) },
      pino({ level: 'silent' }),
    );
    const far = new AgentProcess({
      node: 'far-b',
      tls: {
        args: [
          '--tls-dir',
          await issueTo(path.join(root, 'far-b'), { role: 'agent', name: 'far-b' }),
        ],
        admin: () => farAdmin,
      },
    });
    agents.push(far);
    const near = new AgentProcess({ node: 'near-a' });
    agents.push(near);
    await far.start();
    await near.start();
    await near.createVolume('x', '16MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 0 4m', near.uri('x')]);
    await near.ctl('replicate', 'x', '--to', far.grpcAddress);
    // Its own certificate means nothing there: the link is refused, and says so.
    await waitPeer(near, 'x', far, (p) => p.state !== 'InSync' && p.linkFailures > 0, 'refused');
    expect(await far.client().listVolumes()).toEqual([]);

    const client = near.client();
    const mine = await tlsDirFor({ role: 'agent', name: 'near-a' });
    // A certificate of our CA with the far CA: refused, nothing kept.
    await expect(
      client.setPeerCredentials(far.grpcAddress, {
        ca: farCa.certPem,
        cert: readFileSync(path.join(mine, 'tls.crt'), 'utf8'),
        key: readFileSync(path.join(mine, 'tls.key'), 'utf8'),
      }),
    ).rejects.toThrow(/tls.crt was not issued by a CA in ca.crt/);
    // Missing parts and garbage: refused, each saying why.
    await expect(
      client.setPeerCredentials(far.grpcAddress, { ca: farCa.certPem, cert: '', key: '' }),
    ).rejects.toThrow(/needs address, ca_pem, cert_pem and key_pem/);
    await expect(
      client.setPeerCredentials(far.grpcAddress, { ca: 'garbage', cert: 'garbage', key: 'x' }),
    ).rejects.toThrow(/is not a PEM certificate/);
    const peerDir = await issueTo(path.join(root, 'near'), { role: 'agent', name: 'near-cluster' });
    const pem = {
      ca: farCa.certPem,
      cert: readFileSync(path.join(peerDir, 'tls.crt'), 'utf8'),
      key: readFileSync(path.join(peerDir, 'tls.key'), 'utf8'),
    };
    expect(await client.setPeerCredentials(far.grpcAddress, pem)).toMatchObject({
      identity: 'agent near-cluster',
      changed: true,
    });
    expect(await client.setPeerCredentials(far.grpcAddress, pem)).toMatchObject({ changed: false });
    client.close();
    await waitPeer(near, 'x', far, inSync, 'in sync with credentials');
    await fioVerify(near.uri('x'), '4M');
    await waitPeer(near, 'x', far, inSync, 'in sync after writes');
    await expectIdentical(near, far, 'x');

    // Kept in the data dir: after a SIGKILL the primary reaches the far agent again.
    await near.kill('SIGKILL');
    await near.start();
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7c 8m 4m', near.uri('x')]);
    await waitPeer(near, 'x', far, inSync, 'in sync after the restart');
    await expectIdentical(near, far, 'x');
  });
});

describe('ctl with a certificate from a new CA that only some servers trust yet (a CA rotation)', () => {
  // A trusts the old CA and the new one; B, C and the mediator only the old one. Every
  // server's own certificate is still the old CA's, so ctl (trusting both) accepts them all.
  let a: AgentProcess;
  let b: AgentProcess;
  let c: AgentProcess;
  let mediator: MediatorProcess;
  let root = '';
  let newCaDir = '';

  /** `lockstep ctl --agent <agent>` holding an admin certificate from the new CA. */
  const ctlWithNewCa = (agent: AgentProcess, ...args: string[]) =>
    run(productNode(), [
      lockstepBin,
      'ctl',
      '--agent',
      agent.grpcAddress,
      '--tls-dir',
      newCaDir,
      ...args,
    ]);

  /** The error ctl gives when the `role` at `address` refuses the new CA's certificate. */
  const refusedBy = (role: string, address: string) =>
    new RegExp(
      `the ${role} at ${address.replace(/\./g, '\\.')} refuses us: TLS handshake refused: .*issued by another CA`,
    );

  const roles = () => Promise.all([a, b].map(async (x) => (await volumeStatus(x, 'v')).role));

  beforeAll(async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-rotation-'));
    const oldCa = (await testCa()).ca;
    const newCa = await createAuthority('Lockstep new CA');
    const both = `${oldCa.certPem}\n${newCa.certPem}`;
    newCaDir = path.join(root, 'admin');
    await writeTlsDir(
      newCaDir,
      both,
      await issueCertificate(newCa, { role: 'admin', name: 'admin' }, { validMs: 3_600_000 }),
    );
    const issued = await tlsDirFor({ role: 'agent', name: 'rotating-a' });
    const aDir = path.join(root, 'rotating-a');
    await writeTlsDir(aDir, both, {
      certPem: readFileSync(path.join(issued, 'tls.crt'), 'utf8'),
      keyPem: readFileSync(path.join(issued, 'tls.key'), 'utf8'),
    });
    mediator = await new MediatorProcess().start();
    a = new AgentProcess({
      node: 'rotating-a',
      tls: { args: ['--tls-dir', aDir], admin: adminTransport },
    });
    b = new AgentProcess({ node: 'waiting-b' });
    c = new AgentProcess({ node: 'waiting-c' });
    await Promise.all([a.start(), b.start(), c.start()]);
    await a.createVolume('v', '32MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 4m', a.uri('v')]);
    await a.ctl(
      'replicate',
      'v',
      '--to',
      b.grpcAddress,
      '--mediator',
      mediator.address,
      '--group',
      'v',
    );
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const m = mediator.client();
    try {
      await waitFor(
        'the mediator to count B in sync',
        async () => (await m.record('v')).inSync.includes(b.grpcAddress) || undefined,
        30_000,
      );
    } finally {
      m.close();
    }
  });

  afterAll(async () => {
    for (const x of [a, b, c]) await x?.dispose();
    await mediator?.dispose();
    rmSync(root, { recursive: true, force: true });
  });

  it('ctl move names whichever agent refuses it, --agent or --to, and nothing moves', async () => {
    const before = digest(dataFile(a, 'v'));
    await expect(ctlWithNewCa(a, 'move', 'v', '--to', c.grpcAddress)).rejects.toThrow(
      refusedBy('agent', c.grpcAddress),
    );
    await expect(ctlWithNewCa(b, 'move', 'v', '--to', a.grpcAddress)).rejects.toThrow(
      refusedBy('agent', b.grpcAddress),
    );
    // A target that is not there at all: the error points at the option that named it.
    await expect(ctlWithNewCa(a, 'move', 'v', '--to', '127.0.0.1:1')).rejects.toThrow(
      /cannot reach the agent at 127\.0\.0\.1:1 .*is --to right\?/,
    );
    expect(await roles()).toEqual(['primary', 'secondary']);
    const onC = c.client();
    expect(await onC.listVolumes()).toEqual([]);
    onC.close();
    expect(digest(dataFile(a, 'v'))).toBe(before);
  });

  it('ctl failover and ctl epoch name the agent or the mediator that refuses it; the epoch stands', async () => {
    const m = mediator.client();
    try {
      const record = await m.record('v');
      const before = digest(dataFile(a, 'v'));
      await expect(ctlWithNewCa(b, 'failover', 'v')).rejects.toThrow(
        refusedBy('agent', b.grpcAddress),
      );
      // A accepts the certificate; the mediator behind it does not.
      await expect(ctlWithNewCa(a, 'epoch', 'v')).rejects.toThrow(
        refusedBy('mediator', mediator.address),
      );
      // With the old CA's certificate the mediator answers: only the certificate was wrong.
      expect(await a.ctl('epoch', 'v')).toMatch(`primary:   ${a.grpcAddress}`);
      expect(await m.record('v')).toEqual(record);
      expect(await roles()).toEqual(['primary', 'secondary']);
      expect(digest(dataFile(a, 'v'))).toBe(before);
    } finally {
      m.close();
    }
  });
});

describe('NBD over TCP with STARTTLS', () => {
  let agent: AgentProcess;
  let clientDir = '';
  let caOnly = '';

  beforeAll(async () => {
    agent = await new AgentProcess({ node: 'node-t', nbdTcp: true }).start();
    await agent.createVolume('t', '16MiB');
    clientDir = await tlsDirFor({ role: 'client', name: 'workload' });
    // Trusts the agent, presents nothing.
    caOnly = mkdtempSync(path.join(os.tmpdir(), 'lockstep-ca-only-'));
    writeFileSync(path.join(caOnly, 'ca-cert.pem'), (await testCa()).ca.certPem);
  });

  afterAll(async () => {
    await agent?.dispose();
    rmSync(caOnly, { recursive: true, force: true });
  });

  const qemuIo = (dir: string, ...commands: string[]) =>
    run('qemu-io', [
      '--object',
      `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`,
      '--image-opts',
      `driver=nbd,host=127.0.0.1,port=${agent.nbdTcpPort},export=t,tls-creds=tls0`,
      ...commands.flatMap((c) => ['-c', c]),
    ]);

  it('serves qemu-io and nbdcopy with client certificates, and the data is what the unix socket serves', async () => {
    await qemuIo(clientDir, 'write -P 0x6b 0 4m', 'read -P 0x6b 0 4m');
    const out = mkdtempSync(path.join(os.tmpdir(), 'lockstep-nbds-'));
    try {
      const copy = path.join(out, 'copy.img');
      await run('nbdcopy', [
        `nbds://127.0.0.1:${agent.nbdTcpPort}/t?tls-certificates=${clientDir}`,
        copy,
      ]);
      await expectSameImages(copy, agent.uri('t'));
      expect(
        readFileSync(copy)
          .subarray(0, 4 << 20)
          .every((b) => b === 0x6b),
      ).toBe(true);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('answers every option but STARTTLS with ERR_TLS_REQD until TLS is on, and drops what is not TLS after it', async () => {
    const c = await RawNbd.connect(agent.nbdTcpPort);
    await c.greet();
    c.sendOption(NBD.OPT_LIST);
    expect((await c.readOptionReply()).type).toBe(NBD.ERR_TLS_REQD);
    expect((await c.go('t')).type).toBe(NBD.ERR_TLS_REQD);
    c.sendOption(NBD.OPT_STARTTLS, Buffer.from('x'));
    expect((await c.readOptionReply()).type).toBe(NBD.ERR_INVALID);
    c.sendOption(NBD.OPT_STARTTLS);
    expect((await c.readOptionReply()).type).toBe(NBD.REP_ACK);
    c.socket.write(Buffer.alloc(64, 0x41)); // not a ClientHello
    expect(await c.closedByServer()).toBe(true);

    // EXPORT_NAME has no error reply: before TLS it ends the connection.
    const d = await RawNbd.connect(agent.nbdTcpPort);
    await d.greet();
    d.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('t'));
    expect(await d.closedByServer()).toBe(true);

    // The unix socket offers no TLS.
    const u = await RawNbd.connect(agent.nbdSocket);
    await u.greet();
    u.sendOption(NBD.OPT_STARTTLS);
    expect((await u.readOptionReply()).type).toBe(NBD.ERR_POLICY);
    expect((await u.go('t')).type).toBe(NBD.REP_ACK);
    u.destroy();
  });

  it('refuses a client without TLS, one without a certificate and one with another CA’s; the export is unchanged', async () => {
    const before = digest(dataFile(agent, 't'));
    await expect(
      run('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x11 0 1m',
        `nbd://127.0.0.1:${agent.nbdTcpPort}/t`,
      ]),
    ).rejects.toThrow(/TLS/i);
    await expect(qemuIo(caOnly, 'write -P 0x22 0 1m')).rejects.toThrow();
    const otherCa = await createAuthority('Another CA');
    const stranger = await issueCertificate(
      otherCa,
      { role: 'client', name: 'workload' },
      { validMs: 86_400_000 },
    );
    writeFileSync(path.join(caOnly, 'client-cert.pem'), stranger.certPem);
    writeFileSync(path.join(caOnly, 'client-key.pem'), stranger.keyPem);
    await expect(qemuIo(caOnly, 'write -P 0x33 0 1m')).rejects.toThrow();
    await expect(
      run('nbdinfo', [`nbds://127.0.0.1:${agent.nbdTcpPort}/t?tls-certificates=${caOnly}`]),
    ).rejects.toThrow();
    expect(digest(dataFile(agent, 't'))).toBe(before);
    // The agent serves on.
    await qemuIo(clientDir, 'read -P 0x6b 0 4m');
  });
});

/** An agent's data port, as it advertises it in status (what primaries dial). */
async function dataPortOf(agent: AgentProcess): Promise<string> {
  const c = agent.client();
  try {
    return (await c.status()).dataAddress;
  } finally {
    c.close();
  }
}

describe('lockstep certs and --tls-dir', () => {
  const lockstep = (...args: string[]) => run(productNode(), [lockstepBin, ...args]);
  let dir = '';
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-certs-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('makes a CA once and issues one identity per directory', async () => {
    const ca = path.join(dir, 'ca');
    expect(await lockstep('certs', 'init', ca)).toMatch(/CA written/);
    await expect(lockstep('certs', 'init', ca)).rejects.toThrow(/already holds a CA/);
    expect(
      await lockstep('certs', 'issue', '--ca', ca, '--node', 'n1', '--out', path.join(dir, 'n1')),
    ).toMatch(/certificate for agent n1 written/);
    const cert = new X509Certificate(readFileSync(path.join(dir, 'n1', 'tls.crt')));
    expect(cert.subject).toMatch(/CN=n1\nO=lockstep:agent/);
    expect(cert.checkIssued(new X509Certificate(readFileSync(path.join(ca, 'ca.crt'))))).toBe(true);
    await expect(
      lockstep(
        'certs',
        'issue',
        '--ca',
        ca,
        '--node',
        'n2',
        '--admin',
        '--out',
        path.join(dir, 'x'),
      ),
    ).rejects.toThrow(
      /exactly one of --node, --peer-cluster, --admin, --operator, --mediator, --client/,
    );
    await expect(
      lockstep(
        'certs',
        'issue',
        '--ca',
        path.join(dir, 'nope'),
        '--admin',
        '--out',
        path.join(dir, 'x'),
      ),
    ).rejects.toThrow(/cannot read ca\.crt in the CA directory/);
  });

  it('refuses to start without TLS settings, with both, or with a certificate for someone else', async () => {
    const ca = path.join(dir, 'ca2');
    await lockstep('certs', 'init', ca);
    await lockstep(
      'certs',
      'issue',
      '--ca',
      ca,
      '--node',
      'other',
      '--out',
      path.join(dir, 'other'),
    );
    const data = path.join(dir, 'data');
    const agent = (...extra: string[]) =>
      lockstep('agent', '--node', 'mine', '--data-dir', data, '--listen', '127.0.0.1:0', ...extra);
    await expect(agent()).rejects.toThrow(/no --tls-dir given.*--insecure/);
    await expect(agent('--insecure', '--tls-dir', path.join(dir, 'other'))).rejects.toThrow(
      /contradict/,
    );
    await expect(agent('--tls-dir', path.join(dir, 'other'))).rejects.toThrow(
      /the certificate in .* is for agent other; this process needs one for agent mine/,
    );
    await expect(
      lockstep(
        'mediator',
        '--data-dir',
        path.join(dir, 'm'),
        '--listen',
        '127.0.0.1:0',
        '--tls-dir',
        path.join(dir, 'other'),
      ),
    ).rejects.toThrow(/needs one for mediator/);
  });
});
