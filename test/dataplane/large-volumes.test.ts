// Volumes of many terabytes are normal: replicating one costs what it holds, not its size, and
// the agent keeps serving its other volumes and its API while a baseline runs.
import { readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { run } from '../harness/agent-process';
import { Qd1Writer } from '../harness/qd1-writer';
import { waitFor } from '../harness/processes';
import { expectIdentical, inSync, replicationAgent, waitPeer } from '../harness/replication';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** qemu-io commands writing `pieces` MiB spread over 1 TiB, through the agent (so it knows where). */
function scattered(pieces: number): string[][] {
  const stride = (1024 * GiB) / pieces;
  return Array.from({ length: pieces }, (_, i) => [
    '-c',
    `write -P ${(i % 250) + 1} ${i * stride + ((i * 13) % 1024) * MiB} 1m`,
  ]);
}

describe('large volumes', () => {
  const agents: AgentProcess[] = [];
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
  });

  it('replicates a fresh 8 TiB volume to a second agent and is in sync within seconds', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    await a.createVolume('big', '8TiB');
    const t0 = Date.now();
    await a.ctl('replicate', 'big', '--to', b.grpcAddress);
    const done = await waitPeer(a, 'big', b, inSync, 'in sync', 30_000);
    expect(Date.now() - t0).toBeLessThan(30_000);
    expect(done.resyncBytesSent).toBe(0); // nothing was ever written: nothing to send
    await expectIdentical(a, b, 'big');
  }, 90_000);

  it('resumes a 1 TiB baseline after the primary restarts, zeroing the replica in a few large ops', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('big', '1TiB');
    await run('qemu-io', ['-f', 'raw', ...scattered(64).flat(), uri]);
    await a.ctl('replicate', 'big', '--to', b.grpcAddress, '--max-resync-rate', '16MiB');
    await waitPeer(a, 'big', b, (p) => p.resyncBytesSent >= 8 * MiB, 'part of the baseline sent');
    // A clean stop keeps the allocation map; the replica now holds part of the data, so it is
    // not fresh: the resumed baseline must zero what the primary never wrote, not skip it.
    await a.stop();
    await a.start();
    const done = await waitPeer(a, 'big', b, inSync, 'in sync after the restart', 60_000);
    // The rest of the data, or all of it if the stop came before the cursor was saved: never
    // more, and never only the few regions of zeroes.
    expect(done.resyncBytesSent).toBeLessThanOrEqual(64 * MiB);
    expect(done.resyncBytesSent).toBeGreaterThanOrEqual(32 * MiB);
    await expectIdentical(a, b, 'big');
  }, 120_000);

  it('compares checksums of a 1 TiB volume only where either copy holds data, when a bitmap is lost', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('big', '1TiB');
    await run('qemu-io', ['-f', 'raw', ...scattered(64).flat(), uri]);
    await a.ctl('replicate', 'big', '--to', b.grpcAddress);
    await waitPeer(a, 'big', b, inSync, 'in sync');
    await b.stop();
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x77 ${512 * GiB} 1m`, uri]);
    await waitPeer(a, 'big', b, (p) => p.state !== 'InSync' && p.dirtyBytes > 0, 'behind');
    await a.stop();
    // The bitmap of a peer that is behind is gone: every region must be compared by checksum.
    const volumeDir = path.join(a.dataDir, 'volumes', 'big');
    const bitmaps = readdirSync(volumeDir).filter((f) => f.startsWith('bitmap-'));
    expect(bitmaps).toHaveLength(1);
    rmSync(path.join(volumeDir, bitmaps[0]));
    await b.start();
    await a.start();
    await waitPeer(a, 'big', b, inSync, 'in sync after a checksum resync', 60_000);
    expect(a.proc.log()).toContain('"checksumResync":true');
    await expectIdentical(a, b, 'big');
  }, 120_000);

  it('keeps answering its API and serving another volume while a 1 TiB volume baselines', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('big', '1TiB');
    await a.createVolume('other', '256MiB');
    await run('qemu-io', ['-f', 'raw', ...scattered(128).flat(), uri]);

    const writer = await Qd1Writer.start(a.nbdSocket, 'other', 256 * MiB);
    const client = a.client();
    const callsMs: number[] = [];
    let latenciesMs: number[] = [];
    try {
      await waitFor(
        'the writer to start',
        () => Promise.resolve(writer.count > 20 || undefined),
        10_000,
        10,
      );
      await client.replicate({
        name: 'big',
        targets: [b.grpcAddress],
        mode: 'sync',
        regionSize: 64 * 1024,
        maxResyncBytesPerSecond: 0,
      });
      await waitFor(
        'the baseline to end',
        async () => {
          const t = performance.now();
          try {
            const peer = (await client.getVolume('big')).replication?.peers[0];
            return peer?.state === 'InSync' && Number(peer.dirtyBytes) === 0 ? peer : undefined;
          } finally {
            callsMs.push(performance.now() - t);
          }
        },
        60_000,
        50,
      );
    } finally {
      client.close();
      latenciesMs = await writer.stop();
    }
    expect(latenciesMs.length).toBeGreaterThan(20);
    expect(Math.max(...callsMs)).toBeLessThan(2_000);
    expect(Math.max(...latenciesMs)).toBeLessThan(500);

    const done = await waitPeer(a, 'big', b, inSync, 'in sync');
    expect(done.resyncBytesSent).toBe(128 * MiB);
    await expectIdentical(a, b, 'big');
  }, 240_000);
});
