// Replicating a bench volume to one peer and timing it until the peer is in sync, by the
// primary agent's own clock (its lastInSyncMs): calls and polls are made in-process, since a
// `lockstep ctl` process per call would add a Node start-up and take CPU from the agents.
import type { AgentClient } from '../lib/agent-client';
import { waitFor } from '../test/harness/processes';

export interface InSync {
  /** Unix ms of the Replicate call, and of the peer's InSync by the agent's clock. */
  startedAt: number;
  inSyncAt: number;
  seconds: number;
  /** What the baseline and resyncs sent (data, not zero runs). */
  sentBytes: number;
}

export async function replicateToInSync(
  client: AgentClient,
  name: string,
  peer: string,
  /** Looking often only takes CPU: the agent's timestamp is the measure. */
  pollMs = 250,
): Promise<InSync> {
  const startedAt = Date.now();
  await client.replicate({
    name,
    targets: [peer],
    mode: 'sync',
    regionSize: 64 * 1024,
    maxResyncBytesPerSecond: 0,
  });
  const { inSyncAt, sentBytes } = await waitFor(
    `${name} in sync`,
    async () => {
      const p = (await client.getVolume(name)).replication?.peers[0];
      return p?.state === 'InSync' && Number(p.dirtyBytes) === 0
        ? { inSyncAt: Number(p.lastInSyncMs), sentBytes: Number(p.resyncBytesSent) }
        : undefined;
    },
    600_000,
    pollMs,
  );
  return { startedAt, inSyncAt, seconds: (inSyncAt - startedAt) / 1000, sentBytes };
}
