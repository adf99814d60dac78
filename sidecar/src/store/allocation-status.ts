// A volume file's `base:allocation` context, read off its allocation map: extents never written
// are holes that read as zeroes, the rest is data. While the map is unknown everything is data,
// which is always correct, just not sparse.
import { LockstepError } from '../../../lib/errors';
import {
  ALLOCATION_CONTEXT,
  AllocationFlag,
  type Extent,
  type MetaContexts,
} from '../block-device';
import type { AllocationMap } from './allocation-map';

const NEVER_WRITTEN = AllocationFlag.HOLE | AllocationFlag.ZERO;

export class AllocationStatus implements MetaContexts {
  constructor(
    private readonly map: AllocationMap,
    private readonly size: number,
  ) {}

  list(): string[] {
    return [ALLOCATION_CONTEXT];
  }

  has(name: string): boolean {
    return name === ALLOCATION_CONTEXT;
  }

  /**
   * One extent per run of written or never-written 64 KiB extents. The map finds each run's end
   * a 2 MiB word at a time, so the work follows the number of runs (at most one per 64 KiB of a
   * request, whose length fits 32 bits) rather than the bytes.
   */
  extents(context: string, offset: number, length: number): Promise<Extent[]> {
    if (context !== ALLOCATION_CONTEXT) {
      return Promise.reject(
        new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `no metadata context ${context}`),
      );
    }
    const end = offset + length;
    if (!Number.isSafeInteger(offset) || offset < 0 || length <= 0 || end > this.size) {
      return Promise.reject(
        new LockstepError(
          'LOCKSTEP_ERR_OUT_OF_RANGE',
          `status of ${length} bytes at ${offset} is outside the volume (${this.size} bytes)`,
        ),
      );
    }
    const out: Extent[] = [];
    for (let pos = offset; pos < end;) {
      const data = this.map.nextWritten(pos, end);
      if (data > pos) {
        out.push({ length: data - pos, flags: NEVER_WRITTEN });
        pos = data;
      } else {
        const hole = this.map.nextUnwritten(pos, end);
        out.push({ length: hole - pos, flags: 0 });
        pos = hole;
      }
    }
    return Promise.resolve(out);
  }
}
