// A new replica is established by snapshots: a baseline snapshot, diffs between snapshots
// while the workload writes, a commit after each (from the first on, the replica holds a
// complete state of the primary), then the cutover to live mirroring and InSync. Real agents,
// SIGKILLed mid-way; a proxy cuts the link; images compared with qemu-img.
import { readdirSync, truncateSync } from 'node:fs';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { fioVerify, run } from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import {
  expectIdentical,
  expectSameImages,
  inSync,
  ProxiedReplica,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;

interface PeerJson {
  state: string;
  consistentSnapshot: string;
  linkFailures: number;
  resyncBytesSent: number;
  resync?: { kind: string; doneBytes: number; totalBytes: number };
}

interface SnapshotJson {
  name: string;
  uid: string;
  label: string;
}

async function peer(agent: AgentProcess): Promise<PeerJson> {
  const v = JSON.parse(await agent.ctl('status', 'v', '-o', 'json')) as {
    replication: { peers: PeerJson[] };
  };
  return v.replication.peers[0];
}

async function snapshots(agent: AgentProcess): Promise<SnapshotJson[]> {
  return (
    JSON.parse(await agent.ctl('snapshot', 'list', 'v', '-o', 'json')) as {
      snapshots: SnapshotJson[];
    }
  ).snapshots;
}

/** Polls the primary's view of its peer until `until` holds, recording each phase seen. */
async function watchPhases(
  a: AgentProcess,
  until: (p: PeerJson) => boolean,
  timeoutMs = 120_000,
): Promise<string[]> {
  const seen: string[] = [];
  await waitFor(
    'the phases',
    async () => {
      const p = await peer(a);
      const phase = p.resync ? `${p.state}/${p.resync.kind}` : p.state;
      if (seen.at(-1) !== phase) seen.push(phase);
      return until(p) || undefined;
    },
    timeoutMs,
    20,
  );
  return seen;
}

describe('establishment by snapshots', () => {
  const agents: AgentProcess[] = [];
  const start = async (node: string, extra: string[] = []) => {
    const a = replicationAgent(node, extra);
    agents.push(a);
    return a.start();
  };
  const proxies: ProxiedReplica[] = [];
  afterEach(async () => {
    for (const p of proxies.splice(0)) await p.close();
    for (const a of agents.splice(0)) await a.dispose();
  });

  it('establishes a half-written 1 GiB volume under fio through baseline, diffs and cutover, and ends identical', async () => {
    // Tiny diffs only end the rounds: under fio they never get that small, so it takes them all.
    const a = await start('node-a', ['--cutover-bytes', '4KiB', '--cutover-ms', '0']);
    const b = await start('node-b');
    const uri = await a.createVolume('v', '1GiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 512m', uri]);
    // 64 MiB at 4 MiB/s: writes through the baseline and the diffs after it.
    const workload = fioVerify(uri, '1G', ['--io_size=64M', '--rate_iops=1024']);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    const phases = await watchPhases(a, inSyncPeer);
    await workload;
    const done = await waitPeer(a, 'v', b, inSync, 'in sync');

    expect(phases).toContain('Baselining/baseline');
    expect(phases).toContain('Baselining/incremental');
    expect(phases.indexOf('Baselining/incremental')).toBeGreaterThan(
      phases.indexOf('Baselining/baseline'),
    );
    expect(
      phases.filter((p) => p.startsWith('Resyncing')).every((p) => p === 'Resyncing/cutover'),
    ).toBe(true);
    expect(phases.at(-1)).toBe('InSync');
    const diffs = a.logs().match(/establishment: diff committed/g) ?? [];
    expect(diffs.length).toBeGreaterThanOrEqual(2);
    // The data and what was written meanwhile (64 MiB), not the holes nor whole regions.
    expect(done.resyncBytesSent).toBeGreaterThanOrEqual(512 * MiB);
    expect(done.resyncBytesSent).toBeLessThanOrEqual(1.1 * (512 + 64) * MiB);
    await expectIdentical(a, b, 'v');
    // Nothing left behind on either side.
    expect(await snapshots(a)).toEqual([]);
    expect(await snapshots(b)).toEqual([]);
  });

  it('promotes a replica whose primary died mid-diff as the snapshot it last completed', async () => {
    const a = await start('node-a', ['--cutover-bytes', '4KiB', '--cutover-ms', '0']);
    const b = await start('node-b');
    const uri = await a.createVolume('v', '256MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 32m', uri]);
    // 2 MiB/s of writes against 8 MiB/s of transfer: each diff is about a second long.
    const writer = run('fio', [
      '--name=w',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=4',
      '--rate_iops=512',
      '--time_based',
      '--runtime=120',
    ]).catch(() => 'stopped');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '8MiB');
    await watchPhases(a, (p) => p.resync?.kind === 'incremental' && p.resync.doneBytes > 0, 60_000);
    // From the first commit on the replica has a complete state, and the primary names it.
    expect((await peer(a)).consistentSnapshot).toMatch(/^establish-/);
    await a.kill('SIGKILL');
    expect(await writer).toBe('stopped');

    const [committed] = await snapshots(b);
    expect(committed.name).toMatch(/^establish-/);
    // Never in sync, but complete at its last commit: promoted without --force, rolled back.
    const promoted = JSON.parse(await b.ctl('promote', 'v', '-o', 'json')) as {
      rolledBack: { snapshot: string } | null;
    };
    expect(promoted.rolledBack?.snapshot).toBe(committed.name);
    await a.start();
    await expectSameImages(b.uri('v'), a.uri(`v@${committed.name}`));
  });

  it('refuses to promote a replica that never completed its baseline; a restarted primary resumes it from its saved plan', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '256MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 128m', uri]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '16MiB');
    await watchPhases(a, (p) => p.resync?.kind === 'baseline' && p.resync.doneBytes >= 64 * MiB);
    await a.kill('SIGKILL');
    await expect(b.ctl('promote', 'v')).rejects.toThrow(/never completed its first sync/);
    // The primary back: the baseline goes on from the plan it saved (at most a second, 16 MiB,
    // behind), not from the start (128 MiB).
    await a.start();
    const done = await waitPeer(a, 'v', b, inSync, 'in sync', 60_000);
    expect(a.logs()).toMatch(/resuming the round a restart broke off/);
    expect(done.resyncBytesSent).toBeLessThanOrEqual(96 * MiB);
    await expectIdentical(a, b, 'v');
  });

  it('starts the round over when its saved plan is damaged, and still ends identical', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '256MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64m', uri]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '16MiB');
    await watchPhases(a, (p) => p.resync?.kind === 'baseline' && p.resync.doneBytes >= 32 * MiB);
    await a.kill('SIGKILL');
    const dir = path.join(a.dataDir, 'volumes', 'v');
    const [cursor] = readdirSync(dir).filter((f) => /^establish-.*-cursor\.bin$/.test(f));
    expect(cursor).toBeDefined();
    truncateSync(path.join(dir, cursor), 40);
    await a.start();
    const done = await waitPeer(a, 'v', b, inSync, 'in sync', 60_000);
    expect(a.logs()).toMatch(/establishment cursor unusable; starting over/);
    expect(done.resyncBytesSent).toBeGreaterThanOrEqual(64 * MiB);
    await expectIdentical(a, b, 'v');
  });

  it('resumes a baseline where a cut link left it', async () => {
    const a = await start('node-a');
    const replica = await ProxiedReplica.start('node-b');
    proxies.push(replica);
    agents.push(replica.agent);
    const uri = await a.createVolume('v', '256MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 160m', uri]);
    await a.ctl('replicate', 'v', '--to', replica.address, '--max-resync-rate', '16MiB');
    // Progress counts from where each connection took the round up (160, then 112 MiB left):
    // each cut falls seconds before the end of what is left.
    for (const [at, failures] of [
      [48, 1],
      [32, 2],
    ]) {
      await watchPhases(a, (p) => p.resync?.kind === 'baseline' && p.resync.doneBytes >= at * MiB);
      replica.dropAll();
      await watchPhases(a, (p) => p.linkFailures >= failures, 10_000);
    }
    const done = await waitPeer(a, 'v', replica.asPeer, inSync, 'in sync', 60_000);
    expect(done.resyncBytesSent).toBeGreaterThanOrEqual(160 * MiB);
    expect(done.resyncBytesSent).toBeLessThanOrEqual(1.1 * 160 * MiB);
    await expectIdentical(a, replica.agent, 'v');
  });
});

function inSyncPeer(p: PeerJson): boolean {
  return p.state === 'InSync' && !p.resync;
}
