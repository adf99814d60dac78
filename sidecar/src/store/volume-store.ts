// The volumes an agent owns, under <data-dir>/volumes/<name>/{meta.json,data.img}.
// Creation and deletion are crash-safe: a volume directory appears under its name only once
// complete (built under a dot-name, then renamed), and is renamed away before it is removed.
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { LockstepError, errorMessage, isLockstepError } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { SnapshotCatalog } from '../snapshots/snapshot-catalog';
import { ChangedContexts } from '../snapshots/changed-contexts';
import { OverwriteJournal } from '../snapshots/overwrite-journal';
import { fsyncDir } from '../../../lib/atomic-file';
import { AllocationMap } from './allocation-map';
import { FileBlockDevice } from './file-device';
import {
  newVolumeMetadata,
  readVolumeMetadata,
  writeVolumeMetadata,
  type NewVolume,
  type VolumeMetadata,
} from './volume-metadata';

export const VOLUME_SIZE_ALIGNMENT = 4096;
const OVERWRITE_JOURNAL = 'overwrites.journal';
const ALLOCATION_MAP = 'allocation.map';
// Up to 253 characters, so the operator can name volumes <namespace>.<group>.<volume>.
const NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$/;

/**
 * Opens the snapshots of the volume in `dir` and puts them in the path of every overwrite of
 * its device; a writable device also takes the volume's overwrite journal, whose waiting writes
 * land before anything else reads the file.
 */
export async function attachSnapshots(
  name: string,
  dir: string,
  device: FileBlockDevice,
  log: Logger,
): Promise<SnapshotCatalog> {
  const snapshots = await SnapshotCatalog.open(
    name,
    dir,
    device.size,
    (offset, target) => device.read(offset, target),
    device.allocation,
    log,
  );
  try {
    device.setOverwriteGuard(snapshots.guard);
    if (!device.readOnly) {
      const { journal, waiting } = OverwriteJournal.open(path.join(dir, OVERWRITE_JOURNAL));
      const { landed, dropped } = await device.adoptJournal(journal, waiting, (id, end) =>
        snapshots.holdsRecord(id, end),
      );
      if (landed + dropped > 0)
        log.warn(
          { landed, dropped },
          'writes answered before the agent stopped landed from the overwrite journal' +
            (dropped > 0 ? '; those whose old data a power loss took were dropped' : ''),
        );
    }
  } catch (err) {
    await snapshots.close();
    throw err;
  }
  snapshots.start();
  return snapshots;
}

export type Volume =
  | {
      state: 'Ready';
      name: string;
      dir: string;
      dataFile: string;
      meta: VolumeMetadata;
      device: FileBlockDevice;
      snapshots: SnapshotCatalog;
    }
  | { state: 'Failed'; name: string; dir: string; dataFile: string; error: LockstepError };

export function validateVolumeName(name: string): void {
  if (!NAME_PATTERN.test(name)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid volume name ${JSON.stringify(name)}: use 1-253 lowercase letters, digits, '-', '.', '_', ` +
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

  private constructor(
    readonly root: string,
    private readonly log: Logger,
  ) {}

  /** Opens every volume under `dataDir`; a broken one is kept as Failed with its reason. */
  static async open(dataDir: string, log: Logger): Promise<VolumeStore> {
    const store = new VolumeStore(path.join(dataDir, 'volumes'), log);
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
    const { dir, metaFile } = this.paths(name);
    let { dataFile } = this.paths(name);
    try {
      const meta = await readVolumeMetadata(metaFile);
      if (meta.name !== name) {
        throw new LockstepError(
          'LOCKSTEP_ERR_METADATA_CORRUPT',
          `volume metadata ${metaFile} names volume ${JSON.stringify(meta.name)}, not its directory ${JSON.stringify(name)}`,
        );
      }
      dataFile = meta.dataPath ?? dataFile;
      const device = openDevice(
        dataFile,
        meta,
        AllocationMap.load(path.join(dir, ALLOCATION_MAP), dataFile, meta.sizeBytes),
      );
      const snapshots = await this.openSnapshots(name, dir, device);
      return { state: 'Ready', name, dir, dataFile, meta, device, snapshots };
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

  /** A volume's snapshots, whose guard every overwrite of the device passes from now on. */
  private async openSnapshots(
    name: string,
    dir: string,
    device: FileBlockDevice,
  ): Promise<SnapshotCatalog> {
    try {
      const snapshots = await attachSnapshots(name, dir, device, this.log.child({ volume: name }));
      device.wrapMetaContexts((inner) => new ChangedContexts(inner, snapshots));
      return snapshots;
    } catch (err) {
      device.close();
      throw err;
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

  /**
   * Creates a volume: a new sparse data.img in its directory or, with `dataPath`, a file
   * elsewhere (a PVC's block file) that is adopted as it is, or created if absent.
   */
  async create(spec: NewVolume): Promise<Volume> {
    const { name } = spec;
    validateVolumeName(name);
    if (this.volumes.has(name) || this.busy.has(name)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_EXISTS',
        `volume ${JSON.stringify(name)} already exists`,
      );
    }
    const sharing = this.list().find(
      (v) => spec.dataPath !== undefined && v.dataFile === path.resolve(spec.dataPath),
    );
    if (sharing) {
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_EXISTS',
        `data file ${spec.dataPath} is already served as volume ${sharing.name}`,
      );
    }
    this.busy.add(name);
    const staging = this.paths(name, path.join(this.root, `.creating-${name}`));
    let createdData: string | undefined;
    try {
      await fs.promises.rm(staging.dir, { recursive: true, force: true });
      await fs.promises.mkdir(staging.dir, { mode: 0o700 });
      let sizeBytes: number;
      let fresh = true;
      if (spec.dataPath === undefined) {
        sizeBytes = await createSparseFile(staging.dataFile, spec.sizeBytes);
      } else {
        const adopted = await adoptDataFile(spec.dataPath, spec.sizeBytes);
        sizeBytes = adopted.sizeBytes;
        fresh = adopted.created;
        if (adopted.created) createdData = spec.dataPath;
      }
      const meta = newVolumeMetadata({ ...spec, sizeBytes });
      await writeVolumeMetadata(staging.metaFile, meta);
      const final = this.paths(name);
      await fs.promises.rename(staging.dir, final.dir);
      await fsyncDir(this.root);
      const dataFile = spec.dataPath ?? final.dataFile;
      // An adopted file's data is wherever it is: unknown until a clean stop saves a map.
      const device = openDevice(
        dataFile,
        meta,
        fresh ? AllocationMap.fresh(sizeBytes) : AllocationMap.unknown(sizeBytes),
      );
      const snapshots = await this.openSnapshots(name, final.dir, device);
      const volume: Volume = {
        state: 'Ready',
        name,
        dir: final.dir,
        dataFile,
        meta,
        device,
        snapshots,
      };
      this.volumes.set(name, volume);
      return volume;
    } catch (err) {
      await fs.promises.rm(staging.dir, { recursive: true, force: true });
      if (createdData) await fs.promises.rm(createdData, { force: true });
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

  /**
   * Forgets a volume whose data file lives outside the data dir: its Lockstep state (metadata,
   * bitmaps, activity log) goes, the data file stays where it is.
   */
  async release(name: string): Promise<void> {
    await this.removeDir(this.releasable(name));
  }

  /** The volume, if releasing it keeps its data; the reason otherwise. */
  releasable(name: string): Volume {
    const volume = this.get(name);
    if (volume.state === 'Ready' && volume.meta.dataPath === undefined) {
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${name} keeps its data in the agent's data dir; releasing it would lose the data (delete it instead)`,
      );
    }
    return volume;
  }

  /** Removes the volume and its files, an adopted data file included. The caller makes sure nobody is using it. */
  async delete(name: string): Promise<void> {
    const volume = this.get(name);
    await this.removeDir(volume);
    if (volume.state === 'Ready' && volume.meta.dataPath !== undefined) {
      await fs.promises.rm(volume.meta.dataPath, { force: true });
      await fsyncDir(path.dirname(volume.meta.dataPath));
    }
  }

  private async removeDir(volume: Volume): Promise<void> {
    this.volumes.delete(volume.name);
    if (volume.state === 'Ready') {
      volume.device.close();
      await volume.device.landed();
      await volume.snapshots.close();
    }
    const graveyard = path.join(
      this.root,
      `.deleting-${volume.name}-${randomBytes(4).toString('hex')}`,
    );
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

  /**
   * Saves each volume's allocation map with its data file's identity. Only after the last write
   * and flush of a clean stop: a map saved while writes continue would be trusted wrongly.
   */
  async saveAllocationMaps(): Promise<void> {
    for (const v of this.list()) {
      if (v.state === 'Ready')
        await v.device.allocation.save(path.join(v.dir, ALLOCATION_MAP), v.dataFile);
    }
  }

  async flushAll(): Promise<void> {
    await Promise.all(this.list().flatMap((v) => (v.state === 'Ready' ? [v.device.flush()] : [])));
  }

  async close(): Promise<void> {
    for (const v of this.volumes.values()) {
      if (v.state !== 'Ready') continue;
      v.device.close();
      await v.device.landed();
      await v.snapshots.close();
    }
    this.volumes.clear();
  }
}

async function createSparseFile(file: string, sizeBytes: number | undefined): Promise<number> {
  if (sizeBytes === undefined) {
    throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', 'a new volume needs a size');
  }
  validateVolumeSize(sizeBytes);
  const handle = await fs.promises.open(file, 'wx', 0o600);
  try {
    await handle.truncate(sizeBytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
  return sizeBytes;
}

/**
 * Takes an existing block file as it is (its size must suit a volume; `sizeBytes` is ignored),
 * or creates it sparse with `sizeBytes`.
 */
async function adoptDataFile(
  file: string,
  sizeBytes: number | undefined,
): Promise<{ sizeBytes: number; created: boolean }> {
  if (!path.isAbsolute(file)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `data path ${JSON.stringify(file)} must be absolute`,
    );
  }
  let stat: fs.Stats;
  try {
    stat = await fs.promises.stat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    await fs.promises.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const created = await createSparseFile(file, sizeBytes);
    await fsyncDir(path.dirname(file));
    return { sizeBytes: created, created: true };
  }
  if (!stat.isFile()) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `data path ${file} is not a regular file`,
    );
  }
  if (stat.size === 0 || stat.size % VOLUME_SIZE_ALIGNMENT !== 0) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `data file ${file} is ${stat.size} bytes; a volume must be a positive multiple of ${VOLUME_SIZE_ALIGNMENT} bytes`,
    );
  }
  return { sizeBytes: stat.size, created: false };
}

function openDevice(
  dataFile: string,
  meta: VolumeMetadata,
  allocation: AllocationMap,
): FileBlockDevice {
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
  return new FileBlockDevice(fd, meta.sizeBytes, meta.readOnly, dataFile, allocation);
}
