// The secondary's side of one volume's replication: the session a primary opens with its
// handshake, the data lanes bound to it (at most one primary at a time), and the generation
// the primary hands over once this copy has caught up. It exists while the copy is a secondary.
// A copy about to be caught up is protected by a snapshot from the handshake until that
// generation arrives (snapshots/resync-protection.ts).
import { randomBytes } from 'node:crypto';
import { LockstepError } from '../../../lib/errors';
import { protectBeforeResync, releaseProtection } from '../snapshots/resync-protection';
import type { SnapshotCatalog } from '../snapshots/snapshot-catalog';
import type { FileBlockDevice } from '../store/file-device';
import type { MetaWriter } from '../store/meta-writer';
import type { MediatorConfig, ReplicationMode } from '../store/volume-metadata';
import { forgetPrimaryTracking } from '../tracking/former-primary';
import { TOKEN_BYTES } from './frames';
import type { Generations } from './generations';
import type { LaneBinding, ReplicaLane } from './replica-lane';

export interface PrimaryHello {
  address: string;
  node: string;
  mode: ReplicationMode;
  regionSize: number;
  /** The primary's current generation. */
  generation: string;
  /** The primary's epoch. */
  epoch: number;
  /** The address the primary dialled: this copy's name in the mediator's records. */
  self: string;
  /** The relationship's mediator; undefined without one. */
  mediator: MediatorConfig | undefined;
  /** The relationship's nodes (see VolumeMetadata.members); empty from a primary that sends none. */
  members: readonly string[];
}

export interface SecondaryCopy {
  readonly name: string;
  readonly dir: string;
  readonly meta: MetaWriter;
  readonly local: FileBlockDevice;
  readonly snapshots: SnapshotCatalog;
}

export class SecondarySession {
  /** The token the current primary's data lanes present; empty while there is no session. */
  token = '';
  private primary = '';
  /** The primary said it steps down cleanly (demotion): this copy may be promoted. */
  private primaryLeft = false;
  private readonly lanes = new Map<number, ReplicaLane>();
  /** Write payload bytes its primaries sent (see ReplicationStatus.receivedBytes). */
  receivedBytes = 0;
  /**
   * Since when (ms since the Unix epoch) no primary has streamed to this copy; 0 while one
   * does. A new session starts absent: a copy that restarted has no primary until one dials.
   */
  private absentSince = Date.now();

  constructor(private readonly copy: SecondaryCopy) {}

  /** A primary's lanes are connected right now. */
  get connected(): boolean {
    return this.lanes.size > 0;
  }

  /** A primary is streaming to this copy and has not said it is leaving. */
  get primaryActive(): boolean {
    return this.lanes.size > 0 && !this.primaryLeft;
  }

  /** The last primary said it steps down (a planned switchover, not a loss). */
  get primaryLeftCleanly(): boolean {
    return this.primaryLeft;
  }

  /**
   * How long no primary has streamed to this copy, in ms (0 while one does or after it said it
   * steps down): what a monitor elsewhere judges a lost primary by, read from state.
   */
  primaryAbsentMs(now = Date.now()): number {
    if (this.primaryActive || this.primaryLeft) return 0;
    return now - this.absentSince;
  }

  private laneCountChanged(): void {
    if (this.lanes.size > 0) this.absentSince = 0;
    else if (this.absentSince === 0) this.absentSince = Date.now();
  }

  /** Opens a session for `primary` (replacing any earlier one); refuses a second primary. */
  async accept(primary: PrimaryHello): Promise<void> {
    const name = this.copy.name;
    if (this.primaryActive && this.primary !== primary.address) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${name} is being replicated from ${this.primary}; a second primary (${primary.address}) is refused: demote one of them`,
      );
    }
    const meta = this.copy.meta.meta;
    const repl = meta.replication;
    const known = repl?.peers.length === 1 && repl.peers[0].address === primary.address;
    const sameMediator = JSON.stringify(repl?.mediator) === JSON.stringify(primary.mediator);
    const members = primary.members.length > 0 ? [...primary.members] : meta.members;
    if (
      !known ||
      !sameList(members, meta.members) ||
      repl.mode !== primary.mode ||
      repl.regionSize !== primary.regionSize ||
      repl.self !== primary.self ||
      !sameMediator ||
      primary.epoch > (meta.epoch ?? 0)
    ) {
      // The epoch is durable before this primary's first write can land: after a restart this
      // copy still refuses the primaries it replaced.
      await this.copy.meta.save({
        ...meta,
        epoch: Math.max(primary.epoch, meta.epoch ?? 0),
        replication: {
          mode: primary.mode,
          regionSize: primary.regionSize,
          maxResyncBytesPerSecond: repl?.maxResyncBytesPerSecond ?? 0,
          peers: [{ address: primary.address, node: primary.node, bitmapUuid: null }],
          ...(primary.mediator ? { mediator: primary.mediator } : {}),
          ...(primary.self ? { self: primary.self } : {}),
        },
        ...(members ? { members } : {}),
      });
    }
    this.end('a new handshake replaced the session');
    // Before a token exists, so before any of this primary's writes can land.
    await protectBeforeResync(this.copy.snapshots, meta.generation.current, primary.generation);
    this.token = randomBytes(TOKEN_BYTES).toString('hex');
    this.primary = primary.address;
    this.primaryLeft = false;
    // The handshake is a sign of life; its lanes follow.
    this.absentSince = Date.now();
  }

  /** The primary lists the relationship's nodes anew: durable before the call is answered. */
  async adoptMembers(members: readonly string[]): Promise<void> {
    const meta = this.copy.meta.meta;
    if (sameList(members, meta.members)) return;
    await this.copy.meta.save({ ...meta, members: [...members] });
  }

  /** Binds a data lane that presented `token` and `epoch` as lane `index`; throws why not. */
  attach(token: string, index: number, epoch: number, lane: ReplicaLane): LaneBinding {
    const name = this.copy.name;
    const seen = this.copy.meta.meta.epoch ?? 0;
    if (epoch < seen) {
      throw new LockstepError(
        'LOCKSTEP_ERR_STALE_EPOCH',
        `the primary's epoch ${epoch} is older than this copy's ${seen} (volume ${name}): it was replaced`,
      );
    }
    if (!this.token || token !== this.token) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `stale or unknown session token for volume ${name} (a newer handshake replaced it, or there was none): handshake again`,
      );
    }
    if (this.lanes.has(index)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `lane ${index} of volume ${name}'s session is already connected`,
      );
    }
    this.lanes.set(index, lane);
    this.laneCountChanged();
    const meta = this.copy.meta;
    return {
      device: this.copy.local,
      get epoch() {
        return meta.meta.epoch ?? 0;
      },
      received: (bytes) => (this.receivedBytes += bytes),
      detach: () => {
        if (this.lanes.get(index) !== lane) return;
        this.lanes.delete(index);
        this.laneCountChanged();
      },
    };
  }

  primaryLeaving(): void {
    this.primaryLeft = true;
  }

  /** The primary says this copy now holds everything up to `gen`, in its `epoch`. */
  async adoptGeneration(gen: Generations, epoch: number): Promise<void> {
    // The data this generation vouches for must be on disk before the claim is: otherwise a
    // power loss could leave a copy that says it is in sync and is not (it would never resync).
    await this.copy.local.flush();
    // Released before the claim: a crash in between leaves a complete copy that is merely not
    // known to be, and the primary sends the generation again on its next handshake.
    await releaseProtection(this.copy.snapshots);
    const meta = this.copy.meta.meta;
    await this.copy.meta.save({
      ...meta,
      epoch: Math.max(epoch, meta.epoch ?? 0),
      generation: { current: gen.current, history: gen.history },
    });
    await forgetPrimaryTracking(this.copy.dir);
  }

  /** Closes the session's lanes: its token is no longer accepted. */
  end(reason: string): void {
    this.token = '';
    this.primary = '';
    const lanes = [...this.lanes.values()];
    this.lanes.clear();
    this.laneCountChanged();
    for (const lane of lanes) lane.close(reason);
  }
}

function sameList(a: readonly string[] | undefined, b: readonly string[] | undefined): boolean {
  return JSON.stringify(a ?? []) === JSON.stringify(b ?? []);
}
