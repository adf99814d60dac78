// Failover without split brain, with real processes: two agents and a mediator, an
// acknowledged-write recorder on the primary, and the faults the mediator is there for (the
// primary killed, paused, cut off from its replica; the mediator down). In every scenario:
// every acknowledged write is readable on whichever copy is primary afterwards, at most one
// copy is primary in any epoch, and epochs only increase.
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { MediatorClient } from '../../lib/mediator-client';
import { type MediatorRecord } from '../../lib/mediator-client';
import type { AgentProcess } from '../harness/agent-process';
import { run, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { ackedCount } from '../harness/follow-writer';
import { soakFailover } from '../harness/failover-soak';
import { MediatorProcess } from '../harness/mediator-process';
import { waitFor } from '../harness/processes';
import {
  expectIdentical,
  inSync,
  ProxiedReplica,
  replicationAgent,
  volumeStatus,
  waitPeer,
} from '../harness/replication';

interface Protection {
  mediator: string;
  group: string;
  epoch: number;
  acceptsWrites: boolean;
  state: string;
  detail: string;
  inSync: string[];
}

async function protection(
  agent: AgentProcess,
  volume: string,
): Promise<Protection & { role: string }> {
  const v = (await volumeStatus(agent, volume)) as unknown as {
    role: string;
    replication: { protection: Protection };
  };
  return { ...v.replication.protection, role: v.role };
}

/**
 * Ends a partition. The proxy never resumes a connection it blackholed (a real network would,
 * retransmitting), so those are reset: the agents reconnect as they would after a long one.
 */
function heal(link: ProxiedReplica): void {
  link.setMode('pass');
  link.dropAll();
}

describe('failover through a mediator', () => {
  const agents: AgentProcess[] = [];
  const proxies: ProxiedReplica[] = [];
  const dirs: string[] = [];
  let mediator: MediatorProcess;
  let client: MediatorClient;

  beforeEach(async () => {
    mediator = await new MediatorProcess().start();
    client = mediator.client(2000);
  });

  afterEach(async () => {
    client.close();
    for (const p of proxies.splice(0)) await p.close();
    for (const a of agents.splice(0)) await a.dispose();
    await mediator.dispose();
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  function tmp(): string {
    const d = mkdtempSync(path.join(os.tmpdir(), 'lockstep-failover-'));
    dirs.push(d);
    return d;
  }

  /** Every record the test saw, in order: epochs only increase, one primary per epoch. */
  const seen: MediatorRecord[] = [];
  async function record(group: string): Promise<MediatorRecord> {
    const r = await client.record(group);
    const same = seen.find((s) => s.epoch === r.epoch);
    if (same) expect(same.primary).toBe(r.primary);
    if (seen.length > 0) expect(r.epoch).toBeGreaterThanOrEqual(seen[seen.length - 1].epoch);
    seen.push(r);
    return r;
  }

  /** A primary on A replicating to B (through a proxy) with the mediator; in sync. */
  async function pair(extra: string[] = [], size = '64MiB') {
    seen.length = 0;
    const a = replicationAgent('node-a');
    agents.push(a);
    await a.start();
    const b = await ProxiedReplica.start('node-b');
    proxies.push(b);
    agents.push(b.agent);
    const uri = await a.createVolume('v', size);
    await a.ctl(
      'replicate',
      'v',
      '--to',
      b.address,
      '--mediator',
      mediator.address,
      '--group',
      'v',
      '--grace',
      '2s',
      ...extra,
    );
    await waitPeer(a, 'v', b.asPeer, inSync, 'in sync');
    // In sync for the mediator too: B may take over.
    await waitFor(
      'the mediator to count B in sync',
      async () => ((await record('v')).inSync.includes(b.address) ? true : undefined),
      10_000,
    );
    return { a, b, uri };
  }

  it('promotes the replica when the primary is SIGKILLed; the old primary comes back fenced and resyncs only what changed', async () => {
    const { a, b, uri } = await pair([], '256MiB');
    const before = await record('v');
    expect(before.primary).toBe(a.grpcAddress);
    const log = path.join(tmp(), 'acked.log');
    // Writes within the first 16 MiB: what A may hold alone is there, not all over the volume.
    const writer = startAckWriter(uri, log, 1_000_000, 16, 4096);
    await waitFor(
      'writes acknowledged',
      () => Promise.resolve(ackedCount(log) >= 500 || undefined),
      30_000,
      20,
    );
    const killedAt = Date.now();
    await a.kill('SIGKILL');
    expect(await writer).toMatch(/connection lost/);

    // B takes over on its own, in a newer epoch the mediator granted it.
    await waitFor(
      'B to be promoted',
      async () => ((await protection(b.agent, 'v')).role === 'primary' ? true : undefined),
      20_000,
      100,
    );
    const tookMs = Date.now() - killedAt;
    const after = await record('v');
    expect(after.primary).toBe(b.address);
    expect(after.epoch).toBe(before.epoch + 1);
    const pb = await protection(b.agent, 'v');
    expect(pb).toMatchObject({ epoch: after.epoch, acceptsWrites: true, state: 'holding' });
    expect(tookMs).toBeLessThan(15_000);
    // Nothing acknowledged by A is missing on B.
    const bUri = b.agent.uri('v');
    expect(await verifyAckedWrites(bUri, log)).toBeGreaterThan(0);

    // B writes on alone; then A comes back: it sees the newer epoch and becomes a secondary.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 32m 1m', bUri]);
    await a.start();
    await waitFor(
      'A to be fenced and follow B',
      async () => {
        const p = await protection(a, 'v');
        return p.role === 'secondary' && !p.acceptsWrites ? p : undefined;
      },
      20_000,
    );
    const aPeer = { grpcAddress: a.grpcAddress, node: a.node } as AgentProcess;
    const back = await waitPeer(b.agent, 'v', aPeer, inSync, 'A resynced from B', 60_000);
    // Only what changed: B's new megabyte and what A's activity log held, not 256 MiB.
    expect(back.resyncBytesSent).toBeLessThan(24 * 1024 * 1024);
    await expectIdentical(b.agent, a, 'v');
    const final = await record('v');
    expect(final.primary).toBe(b.address);
    expect(final.inSync).toContain(a.grpcAddress);
  });

  it('keeps the primary when only the link is cut: the replica is not promoted, and resyncs the gap after', async () => {
    const { a, b, uri } = await pair();
    const start = await record('v');
    const log = path.join(tmp(), 'acked.log');
    const writer = startAckWriter(uri, log, 6000, 16, 8192);
    await new Promise((r) => setTimeout(r, 500));
    b.setMode('blackhole');
    // The primary drops B from the record (its head start) and goes on acknowledging.
    await waitFor(
      'A to hold a new epoch without B',
      async () => {
        const r = await record('v');
        return r.epoch > start.epoch && !r.inSync.includes(b.address) ? r : undefined;
      },
      15_000,
    );
    // Longer than B's grace: it lost its primary, but the record says it is not in sync.
    await new Promise((r) => setTimeout(r, 4000));
    const pb = await protection(b.agent, 'v');
    expect(pb.role).toBe('secondary');
    expect(pb.state).toBe('not-eligible');
    expect((await record('v')).primary).toBe(a.grpcAddress);
    heal(b);
    expect(await writer).toMatch(/flushed/);
    const back = await waitPeer(a, 'v', b.asPeer, inSync, 'B back in sync', 60_000);
    expect(back.resyncBytesSent).toBeLessThan(48 * 1024 * 1024);
    expect(await verifyAckedWrites(uri, log)).toBe(6000);
    await expectIdentical(a, b.agent, 'v');
    await waitFor(
      'B counted in sync again',
      async () => ((await record('v')).inSync.includes(b.address) ? true : undefined),
      15_000,
    );
  });

  it('with the mediator down and the link cut, the primary suspends then fails writes, and the replica never takes over', async () => {
    const { a, b, uri } = await pair(['--suspend-limit', '2s']);
    await mediator.proc.kill('SIGKILL');
    await mediator.proc.exited;
    b.setMode('blackhole');
    const log = path.join(tmp(), 'acked.log');
    // Writes that B missed wait for a grant that cannot come, then fail with EIO.
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 64k', uri]).catch(
      (err: Error) => err.message,
    );
    expect(out).toMatch(/Input\/output error/);
    const pa = await protection(a, 'v');
    expect(pa).toMatchObject({ role: 'primary', acceptsWrites: false, state: 'seeking' });
    expect(pa.detail).toMatch(/cannot reach the mediator|new epoch/);
    await new Promise((r) => setTimeout(r, 3000));
    expect((await protection(b.agent, 'v')).state).toBe('mediator-unreachable');
    // The mediator returns: the primary, still asking, gets the epoch before B's grace ends.
    await mediator.start();
    await waitFor(
      'A to be granted',
      async () => ((await protection(a, 'v')).state === 'holding' ? true : undefined),
      15_000,
    );
    const writer = startAckWriter(uri, log, 500, 8, 4096);
    expect(await writer).toMatch(/flushed/);
    await new Promise((r) => setTimeout(r, 3000));
    expect((await protection(b.agent, 'v')).role).toBe('secondary');
    expect((await record('v')).primary).toBe(a.grpcAddress);
    heal(b);
    await waitPeer(a, 'v', b.asPeer, inSync, 'B back in sync', 60_000);
    expect(await verifyAckedWrites(uri, log)).toBe(500);
    await expectIdentical(a, b.agent, 'v');
  });

  it('refuses a paused primary’s late writes once the replica took over (SIGSTOP longer than the grace)', async () => {
    const { a, b, uri } = await pair();
    const log = path.join(tmp(), 'acked.log');
    const writer = startAckWriter(uri, log, 1_000_000, 16, 0);
    await new Promise((r) => setTimeout(r, 1000));
    a.proc.child.kill('SIGSTOP');
    await waitFor(
      'B to be promoted',
      async () => ((await protection(b.agent, 'v')).role === 'primary' ? true : undefined),
      20_000,
      100,
    );
    const taken = await record('v');
    expect(taken.primary).toBe(b.address);
    a.proc.child.kill('SIGCONT');
    // A wakes up with writes in flight: none of them may be acknowledged now.
    await waitFor(
      'A to fence itself',
      async () => {
        const p = await protection(a, 'v');
        return p.role === 'secondary' ? p : undefined;
      },
      20_000,
    );
    await a.kill('SIGKILL');
    await writer;
    expect(await verifyAckedWrites(b.agent.uri('v'), log)).toBeGreaterThan(0);
    expect((await record('v')).primary).toBe(b.address);
  });

  it('fails a consistency group over by hand with ctl failover --group, each volume through the mediator, once', async () => {
    seen.length = 0;
    const a = replicationAgent('node-a');
    agents.push(a);
    await a.start();
    const b = replicationAgent('node-b');
    agents.push(b);
    await b.start();
    for (const v of ['g1', 'g2']) {
      await a.createVolume(v, '16MiB');
      await a.ctl(
        'replicate',
        v,
        '--to',
        b.grpcAddress,
        '--mediator',
        mediator.address,
        '--failover',
        'manual',
      );
      await waitPeer(a, v, b, inSync, 'in sync');
    }
    await a.ctl('group', 'create', 'db', 'g1', 'g2');
    await b.ctl('group', 'create', 'db', 'g1', 'g2');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 1m', a.uri('g1')]);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x32 0 1m', a.uri('g2')]);
    // Each volume has its own record (its group defaults to the volume's UUID).
    const groups: string[] = await Promise.all(
      ['g1', 'g2'].map(async (v) => (await protection(a, v)).group),
    );
    await waitFor(
      'the mediator to count B in sync for both volumes',
      async () => {
        const rs = await Promise.all(groups.map((g) => client.record(g)));
        return rs.every((r) => r.inSync.includes(b.grpcAddress)) || undefined;
      },
      10_000,
    );
    // While A streams to it, B may not take over: A would be cut off with writes in flight.
    await expect(b.ctl('failover', '--group', 'db')).rejects.toThrow(/primary|replicat/i);
    await expect(b.ctl('failover', 'g1', '--group', 'db')).rejects.toThrow(/not both/);
    await expect(b.ctl('failover', '--group', 'nope')).rejects.toThrow(/no consistency group nope/);

    await a.kill('SIGKILL');
    // Manual: B only reports that it has lost its primary.
    await waitFor(
      'B to report its primary lost',
      async () => (await protection(b, 'g1')).state === 'manual' || undefined,
      10_000,
    );
    expect((await protection(b, 'g1')).role).toBe('secondary');
    const before = await Promise.all(groups.map((g) => client.record(g)));
    // Two at once (an operator's monitor and its reconciler may): one promotion, one epoch.
    await Promise.all([b.ctl('failover', 'g1'), b.ctl('failover', 'g1')]);
    const out = await b.ctl('failover', '--group', 'db');
    expect(out).toContain('volume g1 is primary in epoch');
    expect(out).toContain('volume g2 is primary in epoch');
    for (const [i, g] of groups.entries()) {
      const r = await client.record(g);
      expect(r).toMatchObject({ epoch: before[i].epoch + 1, primary: b.grpcAddress });
    }
    await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x31 0 1m', b.uri('g1')]);
    await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x32 0 1m', b.uri('g2')]);
  });

  it('never takes an epoch below one the copies have seen from a mediator that lost its data', async () => {
    const { a, b, uri } = await pair();
    const before = await record('v');
    const held = (await protection(a, 'v')).epoch;
    expect(held).toBe(before.epoch);
    // The mediator comes back empty: every group at epoch 0.
    await mediator.proc.kill('SIGKILL');
    for (const f of readdirSync(mediator.dataDir))
      rmSync(path.join(mediator.dataDir, f), { recursive: true });
    await mediator.start();
    expect((await client.record('v')).epoch).toBe(0);
    // Without a record, B may not take over however long it waits: nothing says it is in sync.
    const log = path.join(tmp(), 'acked.log');
    const writer = startAckWriter(uri, log, 4000, 16, 4096);
    await new Promise((r) => setTimeout(r, 300));
    b.setMode('blackhole');
    // A drops B: the record it claims starts past the epoch A held, not at 1.
    const claimed = await waitFor(
      'A to claim the group again',
      async () => {
        const r = await client.record('v');
        return r.epoch > 0 ? r : undefined;
      },
      15_000,
    );
    expect(claimed).toMatchObject({ epoch: held + 1, primary: a.grpcAddress });
    heal(b);
    expect(await writer).toMatch(/flushed/);
    await waitPeer(a, 'v', b.asPeer, inSync, 'B back in sync', 60_000);
    const again = await waitFor(
      'B counted in sync again',
      async () => {
        const r = await client.record('v');
        return r.inSync.includes(b.address) ? r : undefined;
      },
      15_000,
    );
    // A failover now is granted past every epoch A wrote in.
    await a.kill('SIGKILL');
    await waitFor(
      'B to take over',
      async () => ((await protection(b.agent, 'v')).role === 'primary' ? true : undefined),
      20_000,
      100,
    );
    const pb = await protection(b.agent, 'v');
    expect(pb.epoch).toBe(again.epoch + 1);
    expect(await client.record('v')).toMatchObject({ epoch: pb.epoch, primary: b.address });
    expect(await verifyAckedWrites(b.agent.uri('v'), log)).toBe(4000);
  });

  it('answers bad mediator settings with a clear error and changes nothing', async () => {
    const a = replicationAgent('node-a');
    agents.push(a);
    await a.start();
    await a.createVolume('v', '16MiB');
    const to = ['replicate', 'v', '--to', '127.0.0.1:9'];
    await expect(a.ctl(...to, '--mediator', 'no-port-here')).rejects.toThrow(/--mediator/);
    await expect(a.ctl(...to, '--mediator', mediator.address, '--grace', 'soon')).rejects.toThrow(
      /invalid --grace "soon"/,
    );
    await expect(
      a.ctl(...to, '--mediator', mediator.address, '--failover', 'maybe'),
    ).rejects.toThrow(/maybe/);
    const v = (await volumeStatus(a, 'v')) as unknown as { replication?: unknown };
    expect(v.replication ?? null).toBeNull();
  });

  it('grants the failover exactly once when the mediator is SIGKILLed and restarted in the middle of it', async () => {
    const { a, b } = await pair();
    const before = await record('v');
    await a.kill('SIGKILL');
    // B has lost its primary and counts its grace; the mediator dies under it and comes back.
    await new Promise((r) => setTimeout(r, 1000));
    await mediator.proc.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 1500));
    expect((await protection(b.agent, 'v')).role).toBe('secondary');
    await mediator.start();
    await waitFor(
      'B to be promoted',
      async () => ((await protection(b.agent, 'v')).role === 'primary' ? true : undefined),
      20_000,
      100,
    );
    const after = await record('v');
    expect(after).toMatchObject({ epoch: before.epoch + 1, primary: b.address });
    // A restarted mediator recovered the grant from disk: the same epoch, once.
    await mediator.proc.kill('SIGKILL');
    await mediator.start();
    expect(await record('v')).toMatchObject({ epoch: before.epoch + 1, primary: b.address });
    expect((await protection(b.agent, 'v')).epoch).toBe(before.epoch + 1);
  });

  it('loses no acknowledged write and never has two primaries over 20 rounds of kills, pauses and cuts', async () => {
    const r = await soakFailover(20);
    expect(r.rounds).toHaveLength(20);
    expect(
      r.rounds.filter((x) => x.kind === 'kill-primary' || x.kind === 'pause-primary').length,
    ).toBeGreaterThanOrEqual(8);
    expect(r.writer.acked).toBeGreaterThan(1000);
    expect(r.ackedSlots).toBeGreaterThan(1000);
    expect(r.ackedVerified).toBe(r.ackedSlots);
    expect(r.dualPrimaries).toBe(0);
    expect(r.recordAnomalies).toEqual([]);
    // Epochs only went up, one or more per failover.
    const epochs = r.rounds.map((x) => x.epoch);
    expect([...epochs].sort((x, y) => x - y)).toEqual(epochs);
  }, 900_000);
});
