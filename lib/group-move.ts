// Moving the primary side of volumes (a consistency group) to another agent, as for a node drain
// or load balancing: a copy is established on the new node by snapshots while the workload runs
// (it joins as one more replica), the primary is handed over once that copy is in sync (a
// snapshot on every in-sync copy, then the old primary demoted with its clients cut off), and
// the existing replicas are re-pointed to the new primary, which resyncs them from that
// snapshot: they receive what changed since it, never a new baseline.
//
// Level-triggered: each step reads where the copies stand and takes the next step, so a move
// interrupted anywhere (the caller, an agent) is finished by stepping it again. Used by
// `lockstep ctl move` and by the operator when a relationship's source node changes.
import type { AgentClient, VolumeInfo } from './agent-client';
import { LockstepError, errorMessage, isLockstepError } from './errors';

export type MovePhase = 'Establishing' | 'Repointing' | 'Done';

/** The label of the switchover's snapshot (the agent's MOVE_LABEL). */
const MOVE_LABEL = 'move';

export interface MoveSpec {
  volumes: string[];
  /** The agent group of those volumes: it moves with them. */
  group?: string;
  /** The agent that was primary when the move began, and how its peers reach it. */
  from: AgentClient;
  fromAddress: string;
  /** The agent that becomes primary, as the others reach it. */
  to: AgentClient;
  toAddress: string;
  /** The old primary stays, as a replica of the new one; else it is left demoted, unreplicated. */
  keepSource: boolean;
}

type PeerInfo = NonNullable<VolumeInfo['replication']>['peers'][number];

export interface MoveLink {
  volume: string;
  /** The copy being waited for: the new one while establishing, a replica while re-pointing. */
  peer: string;
  state: string;
  /** baseline, incremental, cutover (establishing), snapshot, bitmap, full (re-pointing). */
  kind: string;
  doneBytes: number;
  totalBytes: number;
  etaSeconds: number;
  /** Everything the primary sent this copy so far (resync and live writes). */
  bytesSent: number;
}

export interface MoveProgress {
  phase: MovePhase;
  links: MoveLink[];
  /** Over the links still copying: bytes done and to do, and the longest ETA (-1: unknown). */
  doneBytes: number;
  totalBytes: number;
  etaSeconds: number;
  /** Set by the step that switched the primary over: how long writes were held for its cut. */
  switchedOver?: { holdMs: number };
  /** Why the last step did not go further, when that is worth telling. */
  note?: string;
}

/** Takes the next step of the move and says where it stands. */
export async function stepMove(spec: MoveSpec): Promise<MoveProgress> {
  const read = () => Promise.all(spec.volumes.map((v) => spec.from.getVolume(v)));
  let src = await read();
  let dst = await Promise.all(spec.volumes.map((v) => volumeOrNone(spec.to, v)));
  let switchedOver: MoveProgress['switchedOver'];
  if (!dst.every((v) => v?.role === 'primary')) {
    const primaries = src.filter((v) => v.role === 'primary');
    if (primaries.length > 0) {
      const links = await establish(spec, primaries);
      if (!links.every(inSync)) return progress('Establishing', links);
      try {
        const { holdMs } = await spec.from.handover(
          primaries.map((v) => v.name),
          spec.toAddress,
          `move-${Date.now()}`,
        );
        switchedOver = { holdMs };
      } catch (err) {
        // The new copy fell behind between the read and the handover (a link blip): not yet.
        if (!isLockstepError(err, 'LOCKSTEP_ERR_NOT_ALLOWED')) throw err;
        return { ...progress('Establishing', links), note: errorMessage(err) };
      }
      src = await read();
    }
    for (const [i, v] of dst.entries()) {
      if (v?.role === 'primary') continue;
      refuseUnlessHandedOver(spec, src[i], v);
      await spec.to.promote(spec.volumes[i], false, replicasAfter(spec, src[i]));
    }
    dst = await Promise.all(spec.volumes.map((v) => spec.to.getVolume(v)));
  }
  const links = (dst as VolumeInfo[]).flatMap((v) =>
    (v.replication?.peerAddresses ?? []).map((address) => link(v, address)),
  );
  if (!links.every(inSync)) return { ...progress('Repointing', links), switchedOver };
  await finish(spec);
  return { ...progress('Done', links), switchedOver };
}

/**
 * Whom the new primary replicates to: the old primary's other replicas, and the old primary
 * itself if it stays. Read from the old primary, whose list nothing changes until the new
 * one, promoted, replicates to it.
 */
function replicasAfter(spec: MoveSpec, src: VolumeInfo): string[] {
  return [
    ...(src.replication?.peerAddresses ?? []).filter((a) => a !== spec.toAddress),
    ...(spec.keepSource ? [spec.fromAddress] : []),
  ];
}

/**
 * A copy is promoted only if its primary handed it over: both sides demoted, at the same
 * generation (it held every write when the handover let go). Anything else is not a move in
 * progress, and promoting would risk a split brain.
 */
function refuseUnlessHandedOver(
  spec: MoveSpec,
  src: VolumeInfo,
  dst: VolumeInfo | undefined,
): void {
  const gen = src.replication?.generation;
  if (src.role === 'secondary' && dst && gen && dst.replication?.generation === gen) return;
  throw new LockstepError(
    'LOCKSTEP_ERR_NOT_ALLOWED',
    `${src.name}: ${spec.toAddress} ${dst ? `is not at the generation ${spec.fromAddress} handed over` : 'has no copy'}; ` +
      `this is not a move in progress (run it against the current primary)`,
  );
}

/** The new copy joins each volume still primary at the source; its links as they stand. */
async function establish(spec: MoveSpec, primaries: VolumeInfo[]): Promise<MoveLink[]> {
  const links: MoveLink[] = [];
  for (let v of primaries) {
    const r = v.replication;
    if (!r?.peerAddresses.includes(spec.toAddress)) {
      v = await spec.from.replicate({
        name: v.name,
        targets: [spec.toAddress],
        mode: r?.mode || 'sync',
        regionSize: r?.regionSize || 0,
        maxResyncBytesPerSecond: Number(r?.maxResyncBytesPerSecond ?? 0),
      });
    }
    links.push(link(v, spec.toAddress));
  }
  return links;
}

/** Every copy is in sync with the new primary: the switchover's snapshots and the group move. */
async function finish(spec: MoveSpec): Promise<void> {
  // Deleted on the new primary, they go from its in-sync replicas too; the old primary, if it
  // is not one of them, drops its own.
  const sides = spec.keepSource ? [spec.to] : [spec.to, spec.from];
  for (const agent of sides) {
    for (const volume of spec.volumes) {
      for (const s of await agent.listSnapshots(volume)) {
        if (s.label === MOVE_LABEL) await agent.deleteSnapshot(volume, s.name).catch(ignoreGone);
      }
    }
  }
  if (!spec.group) return;
  await spec.to.createGroup(spec.group, spec.volumes);
  if ((await spec.from.listGroups()).some((g) => g.name === spec.group))
    await spec.from.deleteGroup(spec.group);
}

function link(v: VolumeInfo, address: string): MoveLink {
  const p: PeerInfo | undefined = v.replication?.peers.find((x) => x.address === address);
  const r = p?.resync;
  return {
    volume: v.name,
    peer: address,
    state: p?.state ?? 'Connecting',
    kind: r?.kind ?? '',
    doneBytes: Number(r?.doneBytes ?? 0),
    totalBytes: Number(r?.totalBytes ?? 0),
    etaSeconds: r ? Number(r.etaSeconds) : -1,
    bytesSent: Number(p?.resyncBytesSent ?? 0) + Number(p?.liveBytesSent ?? 0),
  };
}

function inSync(l: MoveLink): boolean {
  return l.state === 'InSync';
}

function progress(phase: MovePhase, links: MoveLink[]): MoveProgress {
  const copying = links.filter((l) => !inSync(l));
  return {
    phase,
    links,
    doneBytes: copying.reduce((n, l) => n + l.doneBytes, 0),
    totalBytes: copying.reduce((n, l) => n + l.totalBytes, 0),
    etaSeconds: copying.reduce((m, l) => Math.max(m, l.etaSeconds), copying.length ? -1 : 0),
  };
}

async function volumeOrNone(agent: AgentClient, name: string): Promise<VolumeInfo | undefined> {
  try {
    return await agent.getVolume(name);
  } catch (err) {
    if (isLockstepError(err, 'LOCKSTEP_ERR_VOLUME_NOT_FOUND')) return undefined;
    throw err;
  }
}

function ignoreGone(err: unknown): void {
  if (!isLockstepError(err, 'LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND')) throw err;
}
