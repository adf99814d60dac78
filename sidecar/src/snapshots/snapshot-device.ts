// A snapshot as a read-only BlockDevice, so that the NBD server exports it as VOLUME@SNAPSHOT
// like any volume: backup tools, `qemu-img compare`, a mount of an old state.
import { LockstepError } from '../../../lib/errors';
import type { BlockDevice } from '../block-device';
import type { SnapshotCatalog } from './snapshot-catalog';

export class SnapshotDevice implements BlockDevice {
  readonly readOnly = true;

  constructor(
    private readonly catalog: SnapshotCatalog,
    readonly name: string,
    readonly size: number,
  ) {}

  read(offset: number, target: Buffer): Promise<void> {
    if (offset < 0 || offset + target.length > this.size)
      return Promise.reject(
        new LockstepError(
          'LOCKSTEP_ERR_OUT_OF_RANGE',
          `read of ${target.length} bytes at ${offset} is outside the snapshot`,
        ),
      );
    return this.catalog.read(this.name, offset, target);
  }

  private refuse(): Promise<void> {
    return Promise.reject(
      new LockstepError(
        'LOCKSTEP_ERR_READ_ONLY',
        `snapshot ${this.name} is read-only; clone it to write`,
      ),
    );
  }

  write(): Promise<void> {
    return this.refuse();
  }

  writeZeroes(): Promise<void> {
    return this.refuse();
  }

  trim(): Promise<void> {
    return this.refuse();
  }

  /** Nothing to make durable: a snapshot's data was durable before it was reported. */
  flush(): Promise<void> {
    return Promise.resolve();
  }
}
