// A volume's metadata file: identity (UUID), size, generation identifiers and flags. It is
// self-checking (a SHA-256 over its canonical body), so corruption or truncation is reported
// with the file's path instead of being mistaken for an empty or different volume.
import { createHash, randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { z } from 'zod';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { writeFileAtomic } from './atomic-file';

export const METADATA_FORMAT = 1;

const uuid = z.string().uuid();

const metadataBody = z.object({
  format: z.literal(METADATA_FORMAT),
  uuid,
  name: z.string().min(1),
  sizeBytes: z.number().int().positive(),
  createdAt: z.string(),
  readOnly: z.boolean(),
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

export function newVolumeMetadata(
  name: string,
  sizeBytes: number,
  readOnly: boolean,
): VolumeMetadata {
  return {
    format: METADATA_FORMAT,
    uuid: randomUUID(),
    name,
    sizeBytes,
    createdAt: new Date().toISOString(),
    readOnly,
    generation: { current: randomUUID(), history: [] },
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
