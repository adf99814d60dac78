// Lease-based leader election on a real apiserver, with short timings: one leader at a time; a
// standby takes over once a killed leader's lease expires, at once after a release, and never
// before the old leader has stopped believing it leads; transitions are counted in the Lease.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as k8s from '@kubernetes/client-node';
import pino from 'pino';
import { LeaderElector } from '../../operator/src/leader/lease-election';
import { startProcess, waitFor, type ManagedProcess } from '../harness/processes';
import { TcpProxy } from '../harness/tcp-proxy';
import { productNode } from '../harness/product-runtime';

const kubeconfig = process.env.LOCKSTEP_TEST_KUBECONFIG!;
const namespace = `election-${process.pid}`;
const timing = { leaseDurationMs: 2000, renewDeadlineMs: 1500, retryPeriodMs: 250 };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('LeaderElector', () => {
  const kc = new k8s.KubeConfig();
  let coordination: k8s.CoordinationV1Api;
  const electors: LeaderElector[] = [];
  const cleanups: Array<() => Promise<unknown>> = [];
  const log = pino({ level: process.env.LOCKSTEP_LOG_LEVEL ?? 'silent' });

  const elector = (name: string, identity: string, config = kc) => {
    const e = new LeaderElector({ kc: config, namespace, name, identity, log, ...timing });
    electors.push(e);
    return e;
  };
  const lease = (name: string) => coordination.readNamespacedLease({ name, namespace });

  beforeAll(async () => {
    kc.loadFromFile(kubeconfig);
    coordination = kc.makeApiClient(k8s.CoordinationV1Api);
    await kc
      .makeApiClient(k8s.CoreV1Api)
      .createNamespace({ body: { metadata: { name: namespace } } });
  });

  afterAll(async () => {
    await Promise.all(electors.map((e) => e.release()));
    for (const cleanup of cleanups) await cleanup();
    await kc
      .makeApiClient(k8s.CoreV1Api)
      .deleteNamespace({ name: namespace })
      .catch(() => {});
  });

  it('lets exactly one of two candidates lead, and hands over at once on release', async () => {
    const a = elector('pair', 'a');
    const b = elector('pair', 'b');
    const acquiredA = a.acquire().then(() => a);
    const acquiredB = b.acquire().then(() => b);
    const leader = await Promise.race([acquiredA, acquiredB]);
    const standby = leader === a ? b : a;
    const standbyAcquired = leader === a ? acquiredB : acquiredA;

    // Across three lease durations of renewals, there is never a second leader.
    const until = Date.now() + 3 * timing.leaseDurationMs;
    const renewTimes = new Set<string>();
    while (Date.now() < until) {
      expect([a.isLeader, b.isLeader].filter(Boolean)).toHaveLength(1);
      expect(leader.isLeader).toBe(true);
      renewTimes.add(String((await lease('pair')).spec?.renewTime));
      await sleep(100);
    }
    expect(renewTimes.size).toBeGreaterThan(5);
    const held = await lease('pair');
    expect(held.spec).toMatchObject({
      holderIdentity: leader === a ? 'a' : 'b',
      leaseDurationSeconds: 2,
      leaseTransitions: 0,
    });
    // MicroTime: microsecond precision on the wire.
    expect(String(held.spec?.renewTime)).toMatch(/\.\d{6}Z$/);

    const releasedAt = Date.now();
    await leader.release();
    await leader.lost;
    expect(leader.isLeader).toBe(false);
    await standbyAcquired;
    // Well under a lease duration: the standby did not wait for expiry.
    expect(Date.now() - releasedAt).toBeLessThan(timing.leaseDurationMs);
    expect(standby.isLeader).toBe(true);
    expect((await lease('pair')).spec).toMatchObject({
      holderIdentity: standby === a ? 'a' : 'b',
      leaseTransitions: 1,
    });
  });

  it('takes over from a leader that was SIGKILLed, once its lease expires', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-lease-'));
    cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
    const child: ManagedProcess = startProcess(
      'lease-holder',
      productNode(),
      [
        path.join(__dirname, '..', 'harness', 'lease-holder.js'),
        kubeconfig,
        namespace,
        'killed',
        'doomed',
        String(timing.leaseDurationMs),
        String(timing.renewDeadlineMs),
        String(timing.retryPeriodMs),
      ],
      path.join(dir, 'lease-holder.log'),
    );
    cleanups.push(() => child.kill());
    await waitFor(
      'the child to lead',
      () => {
        if (child.child.exitCode !== null) throw new Error(`lease-holder exited:\n${child.log()}`);
        return Promise.resolve(/^leading$/m.test(child.log()) ? true : undefined);
      },
      20_000,
    );

    const standby = elector('killed', 'survivor');
    const acquired = standby.acquire();
    await sleep(2 * timing.leaseDurationMs);
    expect(standby.isLeader).toBe(false);

    await child.kill('SIGKILL');
    const killedAt = Date.now();
    await acquired;
    const took = Date.now() - killedAt;
    // It waited for the lease to expire (less the last renewal's age and one retry), not longer
    // than expiry plus a couple of retries.
    expect(took).toBeGreaterThan(timing.leaseDurationMs - 2 * timing.retryPeriodMs);
    expect(took).toBeLessThan(timing.leaseDurationMs + 1000 + 4 * timing.retryPeriodMs);
    expect((await lease('killed')).spec).toMatchObject({
      holderIdentity: 'survivor',
      leaseTransitions: 1,
    });
  });

  it('stops leading within renewDeadline when cut off, before anyone else can take over', async () => {
    const cluster = kc.getCurrentCluster()!;
    const proxy = await TcpProxy.start(new URL(cluster.server).host);
    cleanups.push(() => proxy.close());
    const proxied = new k8s.KubeConfig();
    proxied.loadFromOptions({
      clusters: [{ ...cluster, server: `https://${proxy.address}` }],
      users: kc.users,
      contexts: kc.contexts,
      currentContext: kc.currentContext,
    });
    const leader = elector('partition', 'cut-off', proxied);
    await leader.acquire();
    const standby = elector('partition', 'connected');
    let standbyLeadsAt = 0;
    const acquired = standby.acquire().then(() => (standbyLeadsAt = Date.now()));
    await sleep(500);

    proxy.setMode('blackhole');
    const cutAt = Date.now();
    await leader.lost;
    const lostAt = Date.now();
    expect(leader.isLeader).toBe(false);
    expect(lostAt - cutAt).toBeLessThanOrEqual(timing.renewDeadlineMs + 100);
    await acquired;
    expect(standbyLeadsAt).toBeGreaterThan(lostAt);
    expect((await lease('partition')).spec).toMatchObject({
      holderIdentity: 'connected',
      leaseTransitions: 1,
    });
  });

  it('stops leading as soon as it sees another holder in the lease', async () => {
    const leader = elector('stolen', 'victim');
    await leader.acquire();
    const current = await lease('stolen');
    await coordination.replaceNamespacedLease({
      name: 'stolen',
      namespace,
      body: { ...current, spec: { ...current.spec, holderIdentity: 'thief' } },
    });
    const stolenAt = Date.now();
    await leader.lost;
    expect(Date.now() - stolenAt).toBeLessThan(2 * timing.retryPeriodMs + 500);
    expect(leader.isLeader).toBe(false);
  });
});
