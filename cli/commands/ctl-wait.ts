// `ctl replicate --wait`, `ctl resolve --wait`: after the call, until every peer of the volume is
// in sync, showing what is being copied (baseline, establishment, resync) with its ETA: a bar
// on a terminal, a line per change otherwise (scripts, logs).
import { LockstepError } from '../../lib/errors';
import type { AgentClient, VolumeInfo } from '../../lib/agent-client';
import { progressDisplay, type Progress } from '../progress-display';

const POLL_MS = 500;
/** From in sync to furthest behind: the volume is shown as its worst peer. */
const ORDER = ['InSync', 'Resyncing', 'Baselining', 'Connecting', 'OutOfSync', 'Disconnected'];

function progressOf(v: VolumeInfo): Progress & { inSync: boolean } {
  const peers = v.replication?.peers ?? [];
  const worst = peers
    .map((p) => p.state)
    .reduce(
      (a, b) => (ORDER.indexOf(b) > ORDER.indexOf(a) || !ORDER.includes(b) ? b : a),
      'InSync',
    );
  const catching = peers.filter((p) => p.resync);
  const etas = catching.map((p) => Number(p.resync?.etaSeconds ?? -1));
  return {
    inSync:
      peers.length > 0 && peers.every((p) => p.state === 'InSync' && Number(p.dirtyBytes) === 0),
    state: worst,
    doneBytes: catching.reduce((n, p) => n + Number(p.resync?.doneBytes ?? 0), 0),
    totalBytes: catching.reduce((n, p) => n + Number(p.resync?.totalBytes ?? 0), 0),
    etaSeconds: etas.includes(-1) ? -1 : Math.max(0, ...etas),
  };
}

/** Polls the volume until every peer is in sync; rejects after `timeoutMs`. */
export async function waitInSync(
  client: AgentClient,
  name: string,
  timeoutMs: number,
): Promise<VolumeInfo> {
  const show = progressDisplay(name, process.stdout);
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const v = await client.getVolume(name);
      const p = progressOf(v);
      if (p.inSync) return v;
      show.update(p);
      if (SPLIT.has(p.state))
        throw new LockstepError(
          'LOCKSTEP_ERR_NOT_ALLOWED',
          `${name}: a peer is in ${p.state}; resolve it first`,
        );
      if (Date.now() >= deadline)
        throw new LockstepError(
          'LOCKSTEP_ERR_UNAVAILABLE',
          `${name} is not in sync after ${Math.round(timeoutMs / 1000)} s: ${p.state}`,
        );
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  } finally {
    show.stop();
  }
}

const SPLIT = new Set(['SplitBrain', 'PeerIsPrimary', 'PeerIsNewer']);
