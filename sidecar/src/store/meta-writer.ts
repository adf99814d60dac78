// A Ready volume's metadata as the engine and the secondary's session change it: the new state
// is what everyone reads at once, and the writes to disk are applied one at a time, in order,
// each writing the latest state, so a slow write can never put an older state back.
import { errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import type { VolumeMetadata } from './volume-metadata';
import type { Volume, VolumeStore } from './volume-store';

export type ReadyVolume = Extract<Volume, { state: 'Ready' }>;

export class MetaWriter {
  private writing: Promise<void> = Promise.resolve();

  constructor(
    private readonly volume: ReadyVolume,
    private readonly store: VolumeStore,
    private readonly log: Logger,
  ) {}

  get meta(): VolumeMetadata {
    return this.volume.meta;
  }

  /** Makes `meta` current now; resolves once it (or a later state) is on disk. */
  save(meta: VolumeMetadata): Promise<void> {
    this.volume.meta = meta;
    this.writing = this.writing
      .catch(() => undefined)
      .then(() => this.store.updateMeta(this.volume.name, this.volume.meta))
      .catch((err: unknown) => {
        this.log.error({ err: errorMessage(err) }, 'volume metadata could not be saved');
        throw err;
      });
    return this.writing;
  }

  /** Settles once every save so far has (successfully or not). */
  async settled(): Promise<void> {
    await this.writing.catch(() => undefined);
  }
}
