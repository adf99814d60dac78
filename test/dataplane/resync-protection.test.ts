// A resync overwrites a secondary in the scan's order, so until it ends the copy is a mix no
// primary ever held. The copy keeps a snapshot of its last complete state from the primary's
// handshake until the resync ends; promoted before that (the primary died), it is rolled back
// to that snapshot first. Real agents, SIGKILLed mid-resync; images compared with qemu-img.
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { run, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import {
  expectIdentical,
  expectSameImages,
  inSync,
  peerOf,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;

interface StatusJson {
  role: string;
  replication?: {
    resyncSnapshot: string;
    peers: {
      address: string;
      state: string;
      resync?: { doneBytes: number };
      consistentSnapshot: string;
      consistentSnapshotAtMs: number;
    }[];
  };
}

interface SnapshotJson {
  name: string;
  uid: string;
  createdAtMs: number;
}

async function status(agent: AgentProcess): Promise<StatusJson> {
  return JSON.parse(await agent.ctl('status', 'v', '-o', 'json')) as StatusJson;
}

async function snapshots(agent: AgentProcess): Promise<SnapshotJson[]> {
  const out = JSON.parse(await agent.ctl('snapshot', 'list', 'v', '-o', 'json')) as {
    snapshots: SnapshotJson[];
  };
  return out.snapshots.map(({ name, uid, createdAtMs }) => ({ name, uid, createdAtMs }));
}

describe('resync protection', () => {
  const agents: AgentProcess[] = [];
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
  });

  /**
   * a replicates v to b, slowly resyncing (2 MiB/s); 2000 acknowledged writes land on both,
   * then b misses 24 MiB while it is down, and comes back: a resync is under way, protected.
   * `s0` on a is what b held when it went down.
   */
  async function resyncUnderWay(): Promise<{
    a: AgentProcess;
    b: AgentProcess;
    acked: string;
    protection: SnapshotJson;
  }> {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '64MiB');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '2MiB');
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const acked = path.join(a.dataDir, 'acked.log');
    expect(await startAckWriter(uri, acked, 2000, 16, 8192)).toMatch(/acked=2000/);
    await waitPeer(a, 'v', b, inSync, 'in sync after the writes');

    await b.kill('SIGKILL');
    await a.ctl('snapshot', 'create', 'v', 's0');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 32m 24m', uri]);
    await waitPeer(a, 'v', b, (p) => p.state === 'OutOfSync' && p.dirtyBytes >= 24 * MiB, 'behind');
    await b.start();
    await waitFor(
      'a resync under way, 4 MiB in',
      async () => {
        const peer = (await status(a)).replication?.peers[0];
        return (peer?.resync?.doneBytes ?? 0) >= 4 * MiB || undefined;
      },
      60_000,
      100,
    );
    expect((await status(b)).replication?.resyncSnapshot).toBe('before-resync');
    const [protection] = await snapshots(b);
    expect(protection.name).toBe('before-resync');
    // The primary names it too, with its time: what promoting the replica now would give.
    expect((await status(a)).replication?.peers[0]).toMatchObject({
      consistentSnapshot: 'before-resync',
      consistentSnapshotAtMs: protection.createdAtMs,
    });
    expect(await a.ctl('status', 'v')).toContain(
      `${new Date(protection.createdAtMs).toISOString()} (before-resync)`,
    );
    return { a, b, acked, protection };
  }

  it('rolls a copy promoted mid-resync back to its last complete state, with every write acknowledged before it', async () => {
    const { a, b, acked, protection } = await resyncUnderWay();
    await a.kill('SIGKILL');

    const promoted = JSON.parse(await b.ctl('promote', 'v', '--force', '-o', 'json')) as {
      volume: StatusJson;
      rolledBack: { snapshot: string; snapshotCreatedAtMs: string; bytes: string } | null;
    };
    expect(promoted.volume.role).toBe('primary');
    expect(promoted.rolledBack).toMatchObject({ snapshot: 'before-resync' });
    expect(Number(promoted.rolledBack?.snapshotCreatedAtMs)).toBe(protection.createdAtMs);
    expect(Number(promoted.rolledBack?.bytes)).toBeGreaterThanOrEqual(4 * MiB);
    expect((await status(b)).replication?.resyncSnapshot).toBe('');
    expect(await snapshots(b)).toEqual([]);

    expect(await verifyAckedWrites(b.uri('v'), acked)).toBe(2000);
    // What the old primary held when b went down, from its snapshot export.
    await a.start();
    await expectSameImages(b.uri('v'), a.uri('v@s0'));
  });

  it('keeps one snapshot across a resync broken off and begun again, and drops it when the copy has caught up', async () => {
    const { a, b, protection } = await resyncUnderWay();
    // Slowed to a crawl, so that it cannot end before b is killed, however slow the steps
    // below are on a loaded machine.
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '64KiB');
    // Neither a user's snapshot of that name, nor deleting the protection.
    await expect(a.ctl('snapshot', 'create', 'v', 'before-resync')).rejects.toThrow(
      /reserved.*LOCKSTEP_ERR_INVALID_ARGUMENT/,
    );
    await expect(b.ctl('snapshot', 'delete', 'v', 'before-resync')).rejects.toThrow(
      /resync.*LOCKSTEP_ERR_SNAPSHOT_IN_USE/,
    );

    const failures = (await peerOf(a, 'v', b)).linkFailures;
    await b.kill('SIGKILL');
    await b.start();
    // Resyncing on a new link: the old one's state may linger until a sees b gone.
    await waitPeer(
      a,
      'v',
      b,
      (p) => p.state === 'Resyncing' && p.linkFailures > failures,
      'resyncing again',
    );
    // The snapshot of the last complete state, not a new one of the mix.
    expect(await snapshots(b)).toEqual([protection]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--max-resync-rate', '0');
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await waitFor(
      'the protection dropped',
      async () => ((await status(b)).replication?.resyncSnapshot === '' ? true : undefined),
      10_000,
      50,
    );
    expect(await snapshots(b)).toEqual([]);
    await expectIdentical(a, b, 'v');
    // And the copy, promoted now, is not rolled back.
    await a.ctl('demote', 'v');
    const promoted = JSON.parse(await b.ctl('promote', 'v', '-o', 'json')) as {
      rolledBack: unknown;
    };
    expect(promoted.rolledBack).toBeNull();
    await expectSameImages(
      path.join(a.dataDir, 'volumes', 'v', 'data.img'),
      path.join(b.dataDir, 'volumes', 'v', 'data.img'),
    );
  });
});
