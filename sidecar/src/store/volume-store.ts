// The volumes an agent owns, under <data-dir>/volumes/<name>/{meta.json,data.img}.
// Creation and deletion are crash-safe: a volume directory appears under its name only once
// complete (built under a dot-name, then renamed), and is renamed away before it is removed.
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { LockstepError, errorMessage, isLockstepError } from '../../../lib/errors';
import { fsyncDir } from './atomic-file';
import { FileBlockDevice } from './file-device';
import {
  newVolumeMetadata,
  readVolumeMetadata,
  writeVolumeMetadata,
  type NewVolume,
  type VolumeMetadata,
} from './volume-metadata';

export const VOLUME_SIZE_ALIGNMENT = 4096;
const NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;

export type Volume =
  | {
      state: 'Ready';
      name: string;
      dir: string;
      dataFile: string;
      meta: VolumeMetadata;
      device: FileBlockDevice;
    }
  | { state: 'Failed'; name: string; dir: string; dataFile: string; error: LockstepError };

export function validateVolumeName(name: string): void {
  if (!NAME_PATTERN.test(name)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid volume name ${JSON.stringify(name)}: use 1-63 lowercase letters, digits, '-', '.', '_', ` +
        'starting and ending with a letter or digit',
    );
  }
}

export function validateVolumeSize(sizeBytes: number): void {
  if (
    !Number.isSafeInteger(sizeBytes) ||
    sizeBytes <= 0 ||
    sizeBytes % VOLUME_SIZE_ALIGNMENT !== 0
  ) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid volume size ${sizeBytes}: it must be a positive multiple of ${VOLUME_SIZE_ALIGNMENT} bytes`,
    );
  }
}

export class VolumeStore {
  private readonly volumes = new Map<string, Volume>();
  private readonly busy = new Set<string>();

  private constructor(readonly root: string) {}

  /** Opens every volume under `dataDir`; a broken one is kept as Failed with its reason. */
  static async open(dataDir: string): Promise<VolumeStore> {
    const store = new VolumeStore(path.join(dataDir, 'volumes'));
    await fs.promises.mkdir(store.root, { recursive: true, mode: 0o700 });
    for (const entry of await fs.promises.readdir(store.root, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      if (entry.name.startsWith('.')) {
        // An interrupted create or delete: never a visible volume, safe to finish removing.
        await fs.promises.rm(path.join(store.root, entry.name), { recursive: true, force: true });
        continue;
      }
      store.volumes.set(entry.name, await store.load(entry.name));
    }
    await fsyncDir(store.root);
    return store;
  }

  private paths(name: string, dir = path.join(this.root, name)) {
    return { dir, metaFile: path.join(dir, 'meta.json'), dataFile: path.join(dir, 'data.img') };
  }

  private async load(name: string): Promise<Volume> {
    const { dir, metaFile, dataFile } = this.paths(name);
    try {
      const meta = await readVolumeMetadata(metaFile);
      if (meta.name !== name) {
        throw new LockstepError(
          'LOCKSTEP_ERR_METADATA_CORRUPT',
          `volume metadata ${metaFile} names volume ${JSON.stringify(meta.name)}, not its directory ${JSON.stringify(name)}`,
        );
      }
      const device = openDevice(dataFile, meta);
      return { state: 'Ready', name, dir, dataFile, meta, device };
    } catch (err) {
      const error = isLockstepError(err)
        ? err
        : new LockstepError(
            'LOCKSTEP_ERR_VOLUME_FAILED',
            `volume ${name} cannot be opened: ${errorMessage(err)}`,
            {
              cause: err,
            },
          );
      return { state: 'Failed', name, dir, dataFile, error };
    }
  }

  list(): Volume[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  get(name: string): Volume {
    const volume = this.volumes.get(name);
    if (!volume) {
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_NOT_FOUND',
        `volume ${JSON.stringify(name)} does not exist on this agent`,
      );
    }
    return volume;
  }

  /** The volume's device, or the reason it cannot be served. */
  ready(name: string): Extract<Volume, { state: 'Ready' }> {
    const volume = this.get(name);
    if (volume.state === 'Failed') throw volume.error;
    return volume;
  }

  async create(spec: NewVolume): Promise<Volume> {
    const { name, sizeBytes } = spec;
    validateVolumeName(name);
    validateVolumeSize(sizeBytes);
    if (this.volumes.has(name) || this.busy.has(name)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_EXISTS',
        `volume ${JSON.stringify(name)} already exists`,
      );
    }
    this.busy.add(name);
    const staging = this.paths(name, path.join(this.root, `.creating-${name}`));
    try {
      await fs.promises.rm(staging.dir, { recursive: true, force: true });
      await fs.promises.mkdir(staging.dir, { mode: 0o700 });
      const handle = await fs.promises.open(staging.dataFile, 'wx', 0o600);
      try {
        await handle.truncate(sizeBytes);
        await handle.sync();
      } finally {
        await handle.close();
      }
      const meta = newVolumeMetadata(spec);
      await writeVolumeMetadata(staging.metaFile, meta);
      const final = this.paths(name);
      await fs.promises.rename(staging.dir, final.dir);
      await fsyncDir(this.root);
      const volume: Volume = {
        state: 'Ready',
        name,
        ...final,
        meta,
        device: openDevice(final.dataFile, meta),
      };
      this.volumes.set(name, volume);
      return volume;
    } catch (err) {
      await fs.promises.rm(staging.dir, { recursive: true, force: true });
      if (isLockstepError(err)) throw err;
      const code =
        (err as NodeJS.ErrnoException).code === 'ENOSPC'
          ? 'LOCKSTEP_ERR_NO_SPACE'
          : 'LOCKSTEP_ERR_IO';
      throw new LockstepError(code, `creating volume ${name} failed: ${errorMessage(err)}`, {
        cause: err,
      });
    } finally {
      this.busy.delete(name);
    }
  }

  /** Removes the volume and its files. The caller makes sure nobody is using it. */
  async delete(name: string): Promise<void> {
    const volume = this.get(name);
    this.volumes.delete(name);
    if (volume.state === 'Ready') volume.device.close();
    const graveyard = path.join(this.root, `.deleting-${name}-${randomBytes(4).toString('hex')}`);
    await fs.promises.rename(volume.dir, graveyard);
    await fsyncDir(this.root);
    await fs.promises.rm(graveyard, { recursive: true, force: true });
  }

  /** Replaces a Ready volume's metadata, durably. */
  async updateMeta(name: string, meta: VolumeMetadata): Promise<void> {
    const volume = this.ready(name);
    await writeVolumeMetadata(path.join(volume.dir, 'meta.json'), meta);
    volume.meta = meta;
  }

  /** Bytes the volume's file occupies on disk (less than its size while sparse). */
  allocatedBytes(volume: Volume): number {
    try {
      return fs.statSync(volume.dataFile).blocks * 512;
    } catch {
      return 0;
    }
  }

  async flushAll(): Promise<void> {
    await Promise.all(this.list().flatMap((v) => (v.state === 'Ready' ? [v.device.flush()] : [])));
  }

  close(): void {
    for (const v of this.volumes.values()) if (v.state === 'Ready') v.device.close();
    this.volumes.clear();
  }
}

function openDevice(dataFile: string, meta: VolumeMetadata): FileBlockDevice {
  let fd: number;
  try {
    fd = fs.openSync(dataFile, 'r+');
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_DATA_FILE_MISMATCH',
      `volume data file ${dataFile} cannot be opened (${errorMessage(err)}); the volume is not served`,
      { cause: err },
    );
  }
  const actual = fs.fstatSync(fd).size;
  if (actual !== meta.sizeBytes) {
    fs.closeSync(fd);
    throw new LockstepError(
      'LOCKSTEP_ERR_DATA_FILE_MISMATCH',
      `volume data file ${dataFile} is ${actual} bytes but its metadata says ${meta.sizeBytes}; ` +
        'it was truncated or replaced outside lockstep, so the volume is not served',
    );
  }
  return new FileBlockDevice(fd, meta.sizeBytes, meta.readOnly, dataFile);
}
