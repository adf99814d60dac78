// A link fails once per connection attempt, however many writes it had in flight: the ops it
// rejects come back to the engine as the link's own error, and must not fail it again (each
// failure doubles the reconnect backoff, so 64 writes in flight once meant waiting the 5 s cap
// instead of ~200 ms).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import {
  expectIdentical,
  inSync,
  peerOf,
  ProxiedReplica,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const STREAMING = new Set(['Resyncing', 'InSync']);

describe('a peer link with many writes in flight', () => {
  const agents: AgentProcess[] = [];
  const dirs: string[] = [];
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  it('fails once when its sockets are cut, and reconnects after the first backoff step', async () => {
    const a = replicationAgent('node-a');
    agents.push(a);
    await a.start();
    const link = await ProxiedReplica.start('node-b');
    agents.push(link.agent);
    try {
      const uri = await a.createVolume('v', '64MiB');
      await a.ctl('replicate', 'v', '--to', link.address);
      await waitPeer(a, 'v', link.asPeer, inSync, 'in sync');
      const before = (await peerOf(a, 'v', link.asPeer)).linkFailures;

      // A slow link keeps the writer's 64 requests in flight at once.
      link.setDelay(50);
      const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-link-'));
      dirs.push(dir);
      const log = path.join(dir, 'acked.log');
      const writer = startAckWriter(uri, log, 3000, 64);
      await waitFor(
        'writes in flight on the link',
        async () => (await peerOf(a, 'v', link.asPeer)).liveBytesSent > 64 * 4096 || undefined,
        30_000,
        20,
      );
      const cutAt = Date.now();
      link.dropAll();
      link.setDelay(0);
      // Reconnected: streaming again (catching up what it missed, or already in sync).
      await waitPeer(
        a,
        'v',
        link.asPeer,
        (p) => p.linkFailures > before,
        'the cut noticed',
        30_000,
        20,
      );
      await waitPeer(a, 'v', link.asPeer, (p) => STREAMING.has(p.state), 'reconnected', 30_000, 20);
      const reconnectedAfterMs = Date.now() - cutAt;
      await writer;
      const back = await waitPeer(a, 'v', link.asPeer, inSync, 'in sync after the cut', 60_000);

      // One failure for the cut; a handshake that finds the control channel still
      // reconnecting may add one or two more, never one per write in flight.
      expect(back.linkFailures - before).toBeGreaterThanOrEqual(1);
      expect(back.linkFailures - before).toBeLessThanOrEqual(3);
      // Back well before the backoff cap (5 s) would allow (the resync that follows is not
      // counted: on a busy machine it takes what it takes).
      expect(reconnectedAfterMs).toBeLessThan(4_500);
      expect(await verifyAckedWrites(uri, log)).toBe(3000);
      await expectIdentical(a, link.agent, 'v');
    } finally {
      await link.close();
    }
  });
});
