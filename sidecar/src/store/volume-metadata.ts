// A volume's metadata file: identity (UUID), size, generation identifiers and flags. It is
// self-checking (a SHA-256 over its canonical body), so corruption or truncation is reported
// with the file's path instead of being mistaken for an empty or different volume.
import { createHash, randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { z } from 'zod';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { writeFileAtomic } from '../../../lib/atomic-file';

export const METADATA_FORMAT = 1;

const uuid = z.string().uuid();

export const REPLICATION_MODES = ['sync', 'strict-sync', 'async'] as const;
export type ReplicationMode = (typeof REPLICATION_MODES)[number];
export type Role = 'primary' | 'secondary';

const peerConfig = z.object({
  /** The peer agent's address (HOST:PORT); also the peer's identity in bitmaps and status. */
  address: z.string().min(1),
  node: z.string(),
  /** Generation at which this copy started recording the peer's missed writes; null in sync. */
  bitmapUuid: uuid.nullable(),
});
export type PeerConfig = z.infer<typeof peerConfig>;

export const FAILOVER_POLICIES = ['automatic', 'manual'] as const;
export type FailoverPolicy = (typeof FAILOVER_POLICIES)[number];

const mediatorConfig = z.object({
  /** HOST:PORT of the mediator (`lockstep mediator`). */
  address: z.string().min(1),
  /** The mediator's record for this volume (a lone volume is a group of one). */
  group: z.string().min(1),
  failover: z.enum(FAILOVER_POLICIES),
  /** How long a replica waits, with the mediator reachable, before it asks to take over. */
  graceMs: z.number().int().nonnegative(),
  /** How long a primary holds writes it cannot get a grant for before failing them (EIO). */
  suspendLimitMs: z.number().int().nonnegative(),
});
export type MediatorConfig = z.infer<typeof mediatorConfig>;

const replicationConfig = z.object({
  mode: z.enum(REPLICATION_MODES),
  regionSize: z.number().int().positive(),
  /** Resync bandwidth cap in bytes per second; 0 means unlimited. */
  maxResyncBytesPerSecond: z.number().int().nonnegative(),
  /** A primary's secondaries; a secondary's primary (whom it replicates to if promoted). */
  peers: z.array(peerConfig),
  /** Split brain protection: epochs granted by a mediator; absent, it is off. */
  mediator: mediatorConfig.optional(),
  /** A secondary's name as its primary dials it: its identity in the mediator's records. */
  self: z.string().optional(),
});
export type ReplicationConfig = z.infer<typeof replicationConfig>;

const metadataBody = z.object({
  format: z.literal(METADATA_FORMAT),
  uuid,
  name: z.string().min(1),
  sizeBytes: z.number().int().positive(),
  createdAt: z.string(),
  readOnly: z.boolean(),
  /**
   * Absolute path of a data file that lives outside the data dir (a block file in a PVC's
   * volume); absent when the data is the volume directory's own data.img.
   */
  dataPath: z.string().startsWith('/').optional(),
  role: z.enum(['primary', 'secondary']),
  /**
   * The newest epoch (fencing token) this copy has seen; a primary's is the one it writes in.
   * Absent means 0: never granted one.
   */
  epoch: z.number().int().nonnegative().optional(),
  /** When (ms since the Unix epoch) this copy was last promoted with --force; absent: never. */
  forcedPromotionAtMs: z.number().int().nonnegative().optional(),
  replication: replicationConfig.nullable(),
  /**
   * The nodes of this copy's relationship (as their certificates name them), as its primary or
   * the control plane last listed them: a secondary takes a new primary only from among them.
   * Absent: none listed yet, so only the primary it has (or, if none, the first) may call.
   */
  members: z.array(z.string().min(1)).optional(),
  /** DRBD-style generation identifiers: replication decides resync direction from them. */
  generation: z.object({
    current: uuid,
    history: z.array(uuid),
  }),
});

export type VolumeMetadata = z.infer<typeof metadataBody>;

const metadataFile = metadataBody.extend({ checksum: z.string().regex(/^sha256:[0-9a-f]{64}$/) });

function checksumOf(body: VolumeMetadata): string {
  // Keys in schema order: the checksum covers a canonical rendering, not the file's spacing.
  const canonical = JSON.stringify(metadataBody.parse(body));
  return `sha256:${createHash('sha256').update(canonical).digest('hex')}`;
}

export interface NewVolume {
  name: string;
  /** Optional only when adopting an existing `dataPath` file, whose size it then is. */
  sizeBytes?: number;
  readOnly?: boolean;
  /** Serve this existing (or new) file instead of a data.img in the volume directory. */
  dataPath?: string;
  /** For a replica: the primary's volume UUID, so every copy carries the same identity. */
  uuid?: string;
  role?: Role;
  replication?: ReplicationConfig | null;
  /** For a replica: the zero generation, until its first complete resync. */
  generation?: string;
  /** For a replica: the relationship's nodes (VolumeMetadata.members). */
  members?: string[];
}

export function newVolumeMetadata(v: NewVolume & { sizeBytes: number }): VolumeMetadata {
  return {
    format: METADATA_FORMAT,
    uuid: v.uuid ?? randomUUID(),
    name: v.name,
    sizeBytes: v.sizeBytes,
    createdAt: new Date().toISOString(),
    readOnly: v.readOnly ?? false,
    ...(v.dataPath === undefined ? {} : { dataPath: v.dataPath }),
    role: v.role ?? 'primary',
    replication: v.replication ?? null,
    ...(v.members ? { members: v.members } : {}),
    generation: { current: v.generation ?? randomUUID(), history: [] },
  };
}

export async function writeVolumeMetadata(file: string, meta: VolumeMetadata): Promise<void> {
  const body = metadataBody.parse(meta);
  const text = JSON.stringify({ ...body, checksum: checksumOf(body) }, null, 2) + '\n';
  await writeFileAtomic(file, text);
}

export async function readVolumeMetadata(file: string): Promise<VolumeMetadata> {
  const corrupt = (why: string, cause?: unknown) =>
    new LockstepError(
      'LOCKSTEP_ERR_METADATA_CORRUPT',
      `volume metadata ${file} is unusable (${why}); the volume is not served. ` +
        'Restore the file from a replica or backup, or delete the volume directory.',
      { cause },
    );
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    throw corrupt(`cannot read it: ${errorMessage(err)}`, err);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw corrupt(text.length === 0 ? 'it is empty' : 'it is not valid JSON (truncated?)', err);
  }
  const parsed = metadataFile.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw corrupt(`field ${issue?.path.join('.') || '(root)'}: ${issue?.message ?? 'invalid'}`);
  }
  const { checksum, ...body } = parsed.data;
  if (checksumOf(body) !== checksum) throw corrupt('checksum mismatch');
  return body;
}
