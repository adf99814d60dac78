// When no bitmap can be trusted, a resync starts from the newest snapshot both copies share:
// they were identical at its cut, so they can differ only where either wrote since, which
// their snapshot logs record. Real agents, SIGKILLed; the copies compared with qemu-img.
import { readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { run } from '../harness/agent-process';
import {
  expectIdentical,
  inSync,
  peerOf,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;

describe('resync from a common snapshot', () => {
  const agents: AgentProcess[] = [];
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
  });

  /** a replicates a 256 MiB volume, 64 MiB of it written, to b; s1 is on both. */
  async function pairWithSnapshot(): Promise<[AgentProcess, AgentProcess, string]> {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '256MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64m', uri]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const taken = JSON.parse(await a.ctl('snapshot', 'create', 'v', 's1', '-o', 'json')) as {
      copies: { state: string }[];
    };
    expect(taken.copies.map((c) => c.state)).toEqual(['Taken', 'Taken']);
    return [a, b, uri];
  }

  it('after a double failure that lost the bitmap, sends what changed since the snapshot, not what a checksum scan reads', async () => {
    const [a, b, uri] = await pairWithSnapshot();
    await b.kill('SIGKILL');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x22 8m 3m',
      '-c',
      'write -P 0x23 200m 1m',
      uri,
    ]);
    await waitPeer(a, 'v', b, (p) => p.state === 'OutOfSync' && p.dirtyBytes > 0, 'behind');
    await a.kill('SIGKILL');
    // The primary's record of what b missed is gone with it: no bitmap to trust.
    const volumeDir = path.join(a.dataDir, 'volumes', 'v');
    for (const f of readdirSync(volumeDir))
      if (f.startsWith('bitmap-')) rmSync(path.join(volumeDir, f));

    await b.start();
    await a.start();
    const caught = await waitPeer(a, 'v', b, inSync, 'in sync again');
    expect(a.logs()).toMatch(/resync from the newest common snapshot/);
    // 4 MiB changed; a checksum scan would have read the 64 MiB written on both copies.
    expect(caught.resyncBytesSent).toBeGreaterThanOrEqual(4 * MiB);
    expect(caught.resyncBytesSent).toBeLessThanOrEqual(4.4 * MiB);
    await expectIdentical(a, b, 'v');
  });

  it('resolves a split brain from the common snapshot: what only the discarded copy wrote is undone too', async () => {
    const [a, b, uri] = await pairWithSnapshot();
    await b.kill('SIGKILL');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x01 0 1m', uri]); // only on a
    await waitPeer(a, 'v', b, (p) => p.state === 'OutOfSync', 'out of sync');
    await a.kill('SIGKILL');
    await b.start();
    await b.ctl('promote', 'v', '--force');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x02 100m 2m', b.uri('v')]); // only on b
    await a.start();
    await a.ctl('demote', 'v');
    await waitPeer(b, 'v', a, (x) => x.state === 'SplitBrain', 'split brain');
    const before = (await peerOf(b, 'v', a)).resyncBytesSent;

    await b.ctl('resolve', 'v', '--discard-peer', a.grpcAddress);
    const caught = await waitPeer(b, 'v', a, inSync, 'resynced from the survivor');
    expect(b.logs()).toMatch(/resync from the newest common snapshot/);
    // b's 2 MiB and a's 1 MiB, which b overwrites with what it holds there (s1's data).
    const sent = caught.resyncBytesSent - before;
    expect(sent).toBeGreaterThanOrEqual(3 * MiB);
    expect(sent).toBeLessThanOrEqual(3.3 * MiB);
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x11 0 1m', a.uri('v')]);
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x02 100m 2m', a.uri('v')]);
    await expectIdentical(a, b, 'v');
  });
});
