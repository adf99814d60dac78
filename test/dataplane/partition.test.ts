// A real partition: the primary's agent runs in a network namespace of its own, and its link
// is cut, so it loses its replica and the mediator together while the test keeps writing to
// both copies' exports (unix sockets, which the partition does not touch). The old primary
// acknowledges nothing it could lose, the replica is promoted, and after healing the old
// primary follows the new one: no split brain, and every acknowledged write is there.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { ackedCount } from '../harness/follow-writer';
import { MediatorProcess } from '../harness/mediator-process';
import { NetNamespace } from '../harness/netns';
import { waitFor } from '../harness/processes';
import { expectIdentical, inSync, volumeStatus, waitPeer } from '../harness/replication';

async function role(agent: AgentProcess): Promise<string> {
  return (await volumeStatus(agent, 'v')).role;
}

describe('a primary cut off from its replica and the mediator', () => {
  let ns: NetNamespace | undefined;
  const agents: AgentProcess[] = [];
  let mediator: MediatorProcess | undefined;
  let dir = '';

  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
    await mediator?.dispose();
    ns?.dispose();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('acknowledges nothing it could lose; the replica takes over; after healing it follows, no split brain', async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-partition-'));
    ns = NetNamespace.create();
    mediator = await new MediatorProcess('', ns.hostIp).start();
    const timeout = ['--peer-timeout', '1500'];
    const b = await new AgentProcess({
      node: 'node-b',
      host: ns.hostIp,
      extraArgs: timeout,
      metrics: true,
    }).start();
    agents.push(b);
    const a = await new AgentProcess({
      node: 'node-a',
      host: ns.nsIp,
      netns: ns,
      extraArgs: timeout,
    }).start();
    agents.push(a);
    await a.createVolume('v', '64MiB');
    await a.ctl(
      'replicate',
      'v',
      '--to',
      b.grpcAddress,
      '--mediator',
      mediator.address,
      '--grace',
      '2s',
      '--suspend-limit',
      '4s',
    );
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const client = mediator.client(2_000);
    const group = (await volumeStatus(a, 'v')).replication?.protection?.group ?? '';
    try {
      const before = await waitFor(
        'the mediator to count B in sync',
        async () => {
          const r = await client.record(group);
          return r.inSync.includes(b.grpcAddress) ? r : undefined;
        },
        10_000,
      );

      const logA = path.join(dir, 'acked-on-a.log');
      const writerA = startAckWriter(a.uri('v'), logA, 1_000_000, 8, 4096);
      await waitFor(
        'writes acknowledged by A',
        () => Promise.resolve(ackedCount(logA) >= 300 || undefined),
        30_000,
        20,
      );
      ns.cut();

      // A can reach neither B nor the mediator: past its suspend limit its writes fail.
      expect(await writerA).toMatch(/connection lost|Input\/output error/);
      // B, still in touch with the mediator, takes over after its grace period.
      await waitFor(
        'B to take over',
        async () => ((await role(b)) === 'primary' ? true : undefined),
        30_000,
        100,
      );
      const granted = await client.record(group);
      expect(granted).toMatchObject({ epoch: before.epoch + 1, primary: b.grpcAddress });
      // What an alert on two copies accepting writes reads.
      const metrics = await waitFor(
        'B to report that it accepts writes',
        async () => {
          const text = await (await fetch(`http://127.0.0.1:${b.metricsPort}/metrics`)).text();
          return /lockstep_replication_accepts_writes\{volume="v"[^}]*\} 1/.test(text)
            ? text
            : undefined;
        },
        10_000,
        100,
      );
      expect(Number(/lockstep_replication_epoch\{volume="v"[^}]*\} (\d+)/.exec(metrics)?.[1])).toBe(
        granted.epoch,
      );
      // Everything A acknowledged is on B: it acknowledged nothing B had not taken.
      expect(await verifyAckedWrites(b.uri('v'), logA)).toBeGreaterThanOrEqual(300);
      const logB = path.join(dir, 'acked-on-b.log');
      expect(await startAckWriter(b.uri('v'), logB, 2_000, 8, 8192)).toMatch(/acked=2000/);

      // Healed: A hears of the newer epoch, steps down and resyncs from B.
      ns.heal();
      await waitFor(
        'A to follow B',
        async () => ((await role(a)) === 'secondary' ? true : undefined),
        30_000,
        200,
      );
      const peer = await waitPeer(b, 'v', a, inSync, 'in sync', 60_000);
      expect(peer.state).toBe('InSync');
      const after = await client.record(group);
      expect(after.primary).toBe(b.grpcAddress);
      expect(after.epoch).toBeGreaterThanOrEqual(granted.epoch);
      expect(await verifyAckedWrites(b.uri('v'), logA)).toBeGreaterThanOrEqual(300);
      expect(await verifyAckedWrites(b.uri('v'), logB)).toBe(2_000);
      await expectIdentical(a, b, 'v');
    } finally {
      client.close();
    }
  }, 120_000);
});
