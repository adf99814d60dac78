// Moving a consistency group's primary to a third agent while clients write: the new copy is
// established by snapshots, the primary is handed over, and the existing replica is re-pointed
// and resynced from the switchover's common snapshot — it receives the writes made during the
// move and nothing more (no second baseline). Real agents and `lockstep ctl move`; the clients
// are libnbd writers that follow the primary and report every write that fails.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { run, verifyAckedWrites } from '../harness/agent-process';
import {
  ackedCount,
  followWriterSummary,
  receivedBytes,
  startFollowWriter,
} from '../harness/follow-writer';
import { waitFor, type ManagedProcess } from '../harness/processes';
import {
  expectIdentical,
  inSync,
  replicationAgent,
  volumeStatus,
  waitPeer,
} from '../harness/replication';

const VOLUMES = ['v1', 'v2'];

describe('moving a consistency group', () => {
  const agents: AgentProcess[] = [];
  const writers: ManagedProcess[] = [];
  let dir = '';
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-move-'));
  });
  afterEach(async () => {
    for (const w of writers.splice(0)) await w.kill('SIGKILL');
    for (const a of agents.splice(0)) await a.dispose();
    rmSync(dir, { recursive: true, force: true });
  });

  /** A primary on `a` replicating v1 and v2 (group g, 4 KiB regions) in sync to `b`. */
  async function replicatedGroup(
    a: AgentProcess,
    b: AgentProcess,
    ...replicateArgs: string[]
  ): Promise<void> {
    for (const v of VOLUMES) {
      await a.createVolume(v, '512MiB');
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 0 64m', a.uri(v)]);
      await a.ctl('replicate', v, '--to', b.grpcAddress, '--region-size', '4KiB', ...replicateArgs);
    }
    await a.ctl('group', 'create', 'g', ...VOLUMES);
    for (const v of VOLUMES) await waitPeer(a, v, b, inSync, 'in sync');
  }

  it('moves a two-volume group to a third agent under load: no write fails, the replica gets only the writes made meanwhile', async () => {
    const [a, b, c] = [await start('a'), await start('b'), await start('c')];
    await replicatedGroup(a, b);

    const stop = path.join(dir, 'stop');
    const logs = VOLUMES.map((v) => path.join(dir, `${v}.acked`));
    for (const [i, v] of VOLUMES.entries()) {
      writers.push(startFollowWriter(`writer-${v}`, [a.uri(v), c.uri(v)], logs[i], stop));
    }
    await waitFor(
      'the writers to be writing',
      () => Promise.resolve(logs.every((l) => ackedCount(l) >= 300) || undefined),
      30_000,
    );

    const received0 = await receivedBytes(b.grpcAddress, VOLUMES);
    const acked0 = logs.map(ackedCount);
    const out = await a.ctl('move', '--group', 'g', '--to', c.grpcAddress);
    writeFileSync(stop, '');
    const summaries = await Promise.all(writers.map(followWriterSummary));
    const written = logs.reduce((n, l, i) => n + (ackedCount(l) - acked0[i]) * 4096, 0);

    expect(out).toMatch(/^establishing: /m);
    expect(out).toMatch(/^switched over: .* is primary \(writes held [\d.]+ ms\)$/m);
    expect(out).toContain(
      `moved: ${c.grpcAddress} is primary of v1, v2; in sync: ${b.grpcAddress}`,
    );
    for (const s of summaries) {
      expect(s).toMatchObject({ failed: 0, errors: [] });
      // Each client was cut off once, at the switchover, and carried on at the new primary.
      expect(s.reconnects).toBe(1);
    }

    for (const v of VOLUMES) {
      const moved = await volumeStatus(c, v);
      expect(moved.role).toBe('primary');
      expect(moved.replication?.peers.map((p) => p.address)).toEqual([b.grpcAddress]);
      expect((await volumeStatus(a, v)).role).toBe('secondary');
      await waitPeer(c, v, b, inSync, 'in sync after the writers stopped');
    }
    // The existing replica was resynced from the switchover's snapshot, not baselined again.
    expect(
      c.logs().match(/"snapshot":"move-\d+".*resync from the newest common snapshot/g),
    ).toHaveLength(2);
    const received = (await receivedBytes(b.grpcAddress, VOLUMES)) - received0;
    expect(written).toBeGreaterThan(0);
    // Up to a queue depth of writes each may have reached it just before the first reading.
    expect(received).toBeGreaterThanOrEqual(written - 2 * 8 * 4096);
    expect(received).toBeLessThanOrEqual(1.1 * written);

    for (const [i, v] of VOLUMES.entries()) {
      await expectIdentical(c, b, v);
      expect(await verifyAckedWrites(c.uri(v), logs[i])).toBe(ackedCount(logs[i]));
    }
    // The group moved with its volumes, and the switchover's snapshots are gone everywhere.
    expect(await c.ctl('group', 'list')).toMatch(/^g\s+v1,v2$/m);
    expect(await a.ctl('group', 'list')).not.toMatch(/^g\s/m);
    for (const agent of [a, b, c])
      expect(await agent.ctl('snapshot', 'list')).not.toContain('move-');
  });

  it('finishes a move whose old primary was SIGKILLed mid-establishment, run again after its restart', async () => {
    const [a, b, c] = [await start('a'), await start('b'), await start('c')];
    // The new copy is established at the relationship's resync rate: seconds per volume.
    await replicatedGroup(a, b, '--max-resync-rate', '16MiB');
    const moving = a.ctl('move', '--group', 'g', '--to', c.grpcAddress);
    await waitPeer(
      a,
      'v1',
      c,
      (p) => (p as { resync?: { doneBytes: number } }).resync?.doneBytes !== undefined,
      'being established',
    );
    await a.kill('SIGKILL');
    await expect(moving).rejects.toThrow(/unavailable|UNAVAILABLE|connect/i);
    await a.start();
    const out = await a.ctl('move', '--group', 'g', '--to', c.grpcAddress);
    expect(out).toContain(
      `moved: ${c.grpcAddress} is primary of v1, v2; in sync: ${b.grpcAddress}`,
    );
    for (const v of VOLUMES) {
      expect((await volumeStatus(a, v)).role).toBe('secondary');
      await expectIdentical(c, b, v);
      await expectIdentical(a, c, v);
    }
  });

  it('refuses to promote a copy that was not handed over; with --keep-source the old primary stays a replica', async () => {
    const [a, b, c] = [await start('a'), await start('b'), await start('c')];
    await replicatedGroup(a, b);
    // Run against the replica, the move would promote c out of nowhere: refused.
    await expect(b.ctl('move', 'v1', '--to', c.grpcAddress)).rejects.toThrow(
      /has no copy; this is not a move in progress/,
    );
    expect((await volumeStatus(b, 'v1')).role).toBe('secondary');

    const moved = JSON.parse(
      await a.ctl('move', '--group', 'g', '--to', c.grpcAddress, '--keep-source', '-o', 'json'),
    ) as { phase: string; switchedOver?: { holdMs: number }; links: { peer: string }[] };
    expect(moved.phase).toBe('Done');
    expect(moved.switchedOver?.holdMs).toBeGreaterThan(0);
    expect(moved.links.map((l) => l.peer).sort()).toEqual(
      [a.grpcAddress, b.grpcAddress, a.grpcAddress, b.grpcAddress].sort(),
    );
    // Done is done: running it again changes nothing and says so.
    const again = JSON.parse(
      await a.ctl('move', '--group', 'g', '--to', c.grpcAddress, '--keep-source', '-o', 'json'),
    ) as { phase: string; switchedOver?: unknown };
    expect(again.phase).toBe('Done');
    expect(again.switchedOver).toBeUndefined();
    // Both former copies follow the new primary: written there, they get it.
    for (const v of VOLUMES) {
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 1m 2m', c.uri(v)]);
      await waitPeer(c, v, a, inSync, 'the old primary in sync');
      await waitPeer(c, v, b, inSync, 'the replica in sync');
      await expectIdentical(a, c, v);
      await expectIdentical(b, c, v);
    }
  });
});
