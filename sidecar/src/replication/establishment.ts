// Establishing a new replica by snapshots (the seed: non-disruptive baseline). The replica
// receives a snapshot S0 of this copy (only what it holds), then the diffs S0→S1, S1→S2, …
// while the workload keeps writing, none of it live. Each round ends with a commit on the
// replica: a snapshot there with S_k's uid, so that from the first commit on it holds a
// complete, crash-consistent state of the primary, and promoted, rolls back to it
// (snapshots/resync-protection.ts). When a round is short (few bytes, or little time) the link
// cuts over: live writes stream to the peer, and its bitmap, cleared just before S_k's cut and
// marked by every write since, is what the ordinary resync copies to make it InSync.
//
// A round broken off resumes with what it still owes, as long as the replica's last commit is
// the one it builds on: its plan is kept here across reconnects, and saved every second (after
// a FLUSH has made what it counts as sent durable on the replica) for an agent restarted
// mid-way, which loses at most the last second of a round.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage } from '../../../lib/errors';
import type { SnapshotCatalog, SnapshotInfo } from '../snapshots/snapshot-catalog';
import { snapshotScanData } from '../snapshots/snapshot-scan';
import { DirtyBitmap, loadDirtyBitmap, saveDirtyBitmap } from '../tracking/dirty-bitmap';
import { OpKind } from './frames';
import type { PeerHost } from './peer-host';
import { resyncDirtyRegions, type ResyncTarget, type ScanSource } from './resync';
import type { ResyncProgress } from './replication-status';

const BLOCK = 4096;
const CURSOR_SAVE_MS = 1000;
/**
 * A round's plan tracks blocks, not the peers' coarser regions, so that a diff of scattered
 * small writes sends those writes; up to 16 Mi entries (2 MiB of bitmap), then coarser.
 */
const PLAN_ENTRIES = 2 ** 24;

function planRegionSize(volumeSize: number): number {
  let size = BLOCK;
  while (Math.ceil(volumeSize / size) > PLAN_ENTRIES) size *= 2;
  return size;
}
/** Where the primary's establishment snapshots are named; no user snapshot may be. */
export const ESTABLISH_PREFIX = 'establish-';
const LABEL = 'establishment';

export interface CutoverPolicy {
  /** A round that sent at most this much is followed by the cutover. */
  bytes: number;
  /** So is one that took at most this long. */
  ms: number;
  /** And any round after this many: a diff that never shrinks is finished by the resync. */
  rounds: number;
}

export const DEFAULT_CUTOVER: CutoverPolicy = { bytes: 64 * 1024 * 1024, ms: 2000, rounds: 8 };

/** The link a round is sent over; `commit` makes the replica hold the snapshot it received. */
export interface EstablishTarget extends ResyncTarget {
  commit(snapshot: SnapshotInfo): Promise<void>;
  begin(kind: ResyncProgress['kind'], totalBytes: number): void;
}

interface Round {
  snapshot: SnapshotInfo;
  plan: DirtyBitmap;
  incremental: boolean;
  /** The replica read zeroes wherever the plan still has regions when the round began. */
  peerIsZero: boolean;
  bytes: number;
  startedAt: number;
}

/** Where this copy's establishment snapshots for `peer` are named. */
function prefixOf(peer: string): string {
  return `${ESTABLISH_PREFIX}${createHash('sha256').update(peer).digest('hex').slice(0, 8)}-`;
}

/**
 * Deletes this copy's establishment snapshots for `peer` but those in `keep`: each one makes
 * every first overwrite save old data, so none outlives its use (nor a peer no longer
 * replicated to).
 */
export async function dropEstablishment(
  snapshots: SnapshotCatalog,
  peer: string,
  keep: ReadonlySet<string | undefined> = new Set(),
): Promise<void> {
  const prefix = prefixOf(peer);
  for (const s of snapshots.list())
    if (s.name.startsWith(prefix) && !keep.has(s.name)) await snapshots.delete(s.name);
}

export class Establishment {
  private base: SnapshotInfo | undefined;
  private round: Round | undefined;
  private rounds = 0;
  private readonly prefix: string;

  constructor(
    private readonly host: PeerHost,
    private readonly peer: string,
    private readonly policy: CutoverPolicy = DEFAULT_CUTOVER,
  ) {
    this.prefix = prefixOf(peer);
  }

  /**
   * Runs rounds until one is short; resolves with the snapshot the replica last committed (the
   * cutover's base), or undefined if `stale` turned true. `committedUid`: the replica's last
   * commit, from its handshake; `fresh`: it reads zeroes everywhere.
   */
  async run(
    link: EstablishTarget,
    committedUid: string,
    fresh: boolean,
    stale: () => boolean,
  ): Promise<SnapshotInfo | undefined> {
    const snapshots = this.host.snapshots;
    // The round in flight goes on where it stopped if the replica still holds what it was
    // sent: the same last commit, and not a copy that reads zeroes everywhere (recreated).
    if ((this.base?.uid ?? '') !== committedUid || fresh) {
      this.round = undefined;
      this.base = committedUid
        ? snapshots.list().find((s) => s.uid === committedUid && s.label === LABEL)
        : undefined;
    }
    // An agent restarted mid-round: the saved plan, if it is still the round to run.
    if (!this.round && !fresh) this.round = await this.loadCursor(committedUid);
    await this.dropOthers();
    for (;;) {
      const round = this.round ?? (await this.nextRound(fresh));
      if (stale()) return undefined;
      link.begin(round.incremental ? 'incremental' : 'baseline', round.plan.dirtyBytes());
      await this.withCursorSaved(link, round, () =>
        resyncDirtyRegions(link, this.source(round), stale, { peerIsZero: round.peerIsZero }),
      );
      if (stale()) return undefined;
      await link.commit(round.snapshot);
      await rm(this.cursorFile, { force: true });
      const previous = this.base;
      this.base = round.snapshot;
      this.round = undefined;
      if (previous) await snapshots.delete(previous.name);
      const { bytes, ms, rounds } = this.policy;
      const took = performance.now() - round.startedAt;
      this.host.log.info(
        {
          round: this.rounds,
          snapshot: round.snapshot.name,
          bytes: round.bytes,
          ms: Math.round(took),
        },
        round.incremental ? 'establishment: diff committed' : 'establishment: baseline committed',
      );
      if (round.bytes <= bytes || took <= ms || this.rounds >= rounds) return this.base;
    }
  }

  /**
   * The cutover's plan, called with writes held and none in flight: every block written since
   * `base` (each is in its logs by now), to be read from the volume itself, since from here on
   * live writes stream to the peer and a copy must not overtake them.
   */
  remainder(base: SnapshotInfo): ScanSource {
    const { host } = this;
    const plan = new DirtyBitmap(host.sizeBytes, planRegionSize(host.sizeBytes));
    host.snapshots.changedBlocks(base.name).markBytes(plan);
    // The splitter locks its own (coarser) regions: the ones holding the plan's.
    const hostRegions = Math.ceil(host.sizeBytes / host.regionSize);
    const hostRegion = (byte: number) =>
      Math.min(hostRegions - 1, Math.floor(byte / host.regionSize));
    return {
      sizeBytes: host.sizeBytes,
      regionSize: plan.regionSize,
      maxResyncBytesPerSecond: host.maxResyncBytesPerSecond,
      local: host.local,
      tracking: {
        bitmap: () => plan,
        clearRange: (_peer, first, last) => plan.clearRange(first, last),
      },
      withRegionsLocked: (first, last, work) =>
        host.withRegionsLocked(
          hostRegion(first * plan.regionSize),
          hostRegion((last + 1) * plan.regionSize - 1),
          work,
        ),
    };
  }

  /** The peer is in sync (after a cutover, or otherwise): no snapshot is needed here. */
  async finish(): Promise<void> {
    this.base = undefined;
    this.round = undefined;
    this.rounds = 0;
    await rm(this.cursorFile, { force: true });
    await this.dropOthers();
  }

  private get cursorFile(): string {
    return path.join(this.host.dir, `${this.prefix}cursor.bin`);
  }

  /** Runs a round's copy pass, saving its plan every second meanwhile. */
  private async withCursorSaved(
    link: EstablishTarget,
    round: Round,
    work: () => Promise<void>,
  ): Promise<void> {
    let saving: Promise<void> | undefined;
    const timer = setInterval(() => {
      saving ??= this.saveCursor(link, round)
        .catch((err: unknown) =>
          this.host.log.warn({ err: errorMessage(err) }, 'establishment cursor not saved'),
        )
        .finally(() => (saving = undefined));
    }, CURSOR_SAVE_MS);
    try {
      await work();
    } finally {
      clearInterval(timer);
      await saving;
    }
  }

  private async saveCursor(link: EstablishTarget, round: Round): Promise<void> {
    const { host } = this;
    const plan = round.plan;
    // The plan as it is now; what it counts as sent is made durable on the replica first.
    const copy = DirtyBitmap.fromBuffer(host.sizeBytes, plan.regionSize, plan.toBuffer());
    await link.send(OpKind.FLUSH, 0, 0, undefined, 0, 'spread');
    if (this.round !== round) return;
    await saveDirtyBitmap(
      this.cursorFile,
      {
        volumeUuid: host.uuid,
        peer: this.peer,
        volumeSize: host.sizeBytes,
        regionSize: plan.regionSize,
        round: {
          snapshotUid: round.snapshot.uid,
          baseUid: this.base?.uid ?? '',
          peerIsZero: round.peerIsZero,
        },
      },
      copy,
    );
  }

  /** The round a restarted agent was running, if it builds on the replica's last commit. */
  private async loadCursor(committedUid: string): Promise<Round | undefined> {
    const { host } = this;
    let saved;
    try {
      saved = await loadDirtyBitmap(this.cursorFile, {
        volumeUuid: host.uuid,
        volumeSize: host.sizeBytes,
        regionSize: planRegionSize(host.sizeBytes),
      });
    } catch (err) {
      // None (the usual case), or damaged: the round starts over.
      if (existsSync(this.cursorFile))
        host.log.warn({ err: errorMessage(err) }, 'establishment cursor unusable; starting over');
      return undefined;
    }
    const r = saved.header.round;
    const snapshot =
      r && saved.header.peer === this.peer && r.baseUid === committedUid
        ? host.snapshots.list().find((s) => s.uid === r.snapshotUid && s.label === LABEL)
        : undefined;
    if (!r || !snapshot || (r.baseUid !== '' && !this.base)) return undefined;
    this.rounds++;
    host.log.info(
      { snapshot: snapshot.name, leftBytes: saved.bitmap.dirtyBytes() },
      'establishment: resuming the round a restart broke off',
    );
    return {
      snapshot,
      plan: saved.bitmap,
      incremental: r.baseUid !== '',
      peerIsZero: r.peerIsZero,
      bytes: saved.bitmap.dirtyBytes(),
      startedAt: performance.now(),
    };
  }

  private async nextRound(fresh: boolean): Promise<Round> {
    const { host } = this;
    // Cleared before the cut: from it on, every write this peer misses is marked, so at the
    // cutover the bitmap holds what changed since the snapshot (and a few writes before it).
    const tracked = host.tracking.bitmap(this.peer);
    host.tracking.clearRange(this.peer, 0, tracked.regionCount - 1);
    const snapshot = await host.snapshots.create(`${this.prefix}${Date.now()}`, LABEL);
    const plan = new DirtyBitmap(host.sizeBytes, planRegionSize(host.sizeBytes));
    if (this.base) host.snapshots.changedBetween(this.base.name, snapshot.name).markBytes(plan);
    else plan.setAll();
    this.rounds++;
    this.round = {
      snapshot,
      plan,
      incremental: this.base !== undefined,
      peerIsZero: fresh && this.base === undefined,
      bytes: plan.dirtyBytes(),
      startedAt: performance.now(),
    };
    return this.round;
  }

  /** A snapshot does not change: nothing to lock, and the round's plan is its own. */
  private source(round: Round): ScanSource {
    const { host } = this;
    return {
      sizeBytes: host.sizeBytes,
      regionSize: round.plan.regionSize,
      maxResyncBytesPerSecond: host.maxResyncBytesPerSecond,
      local: snapshotScanData(host.snapshots, round.snapshot.name, host.local),
      tracking: {
        bitmap: () => round.plan,
        clearRange: (_peer, first, last) => round.plan.clearRange(first, last),
      },
      withRegionsLocked: (_first, _last, work) => work(),
    };
  }

  /** This peer's establishment snapshots other than the base and the round in flight. */
  private dropOthers(): Promise<void> {
    const keep = new Set([this.base?.name, this.round?.snapshot.name]);
    return dropEstablishment(this.host.snapshots, this.peer, keep);
  }
}
