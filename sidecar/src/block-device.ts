// The narrow interface every layer implements and the frontends (NBD today) see: a local file
// (store/), the splitter that fans each write out to the local file and the peers (engine/),
// and the volume's engine whatever its role. Frontends never learn which one they talk to, so
// it belongs to none of those layers.
//
// Offsets and lengths are validated by the caller against `size`; implementations reject
// anything outside with LOCKSTEP_ERR_OUT_OF_RANGE as a last line of defence.

export interface ZeroOptions {
  /** Force-unit-access: durable before the promise resolves. */
  fua: boolean;
  /** The range must stay allocated (no hole punched). */
  noHole: boolean;
}

/** A run of bytes that share one status in a metadata context. */
export interface Extent {
  length: number;
  /** The status, as the context defines its bits. */
  flags: number;
}

/**
 * Status a device can report about its ranges, in named contexts (NBD's metadata contexts,
 * queried with NBD_CMD_BLOCK_STATUS). Each context defines the meaning of its flags, and a
 * layer that adds contexts answers for its names and hands the others to the device below it.
 * Names are `namespace:leaf`; a family with a parameter (a snapshot layer's
 * `lockstep:changed:<snapshot>`) lists the members that exist and accepts them by name.
 */
export interface MetaContexts {
  /** The contexts a client may select, for listing. */
  list(): string[];
  /** Whether `name` can be selected, including a family member `list` leaves out. */
  has(name: string): boolean;
  /**
   * The status of the range from `offset`: consecutive extents starting there, at least one,
   * none empty, together no longer than `length`. They may stop short of it (the caller asks
   * again from where they end), which bounds the work of one call.
   */
  extents(context: string, offset: number, length: number): Promise<Extent[]>;
}

/**
 * NBD's `base:allocation`: which ranges are holes, and which read as zeroes. A device that
 * cannot tell reports 0 (allocated data), which is always correct.
 */
export const ALLOCATION_CONTEXT = 'base:allocation';
export const AllocationFlag = { HOLE: 1, ZERO: 2 } as const;

export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * A primary stepping down: its writes are refused with ESHUTDOWN (send it to the next
   * primary) rather than EPERM (this export never takes writes).
   */
  readonly leaving?: boolean;
  /** Fills `target` with the bytes at `offset`. */
  read(offset: number, target: Buffer): Promise<void>;
  /** Writes `data` at `offset`; with `fua` it is durable when the promise resolves. */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Makes the range read as zeroes. */
  writeZeroes(offset: number, length: number, opts: ZeroOptions): Promise<void>;
  /** Advises that the range is unused; its contents are unspecified until written again. */
  trim(offset: number, length: number): Promise<void>;
  /** Makes every write that completed before this call durable. */
  flush(): Promise<void>;
  /** The metadata contexts the device reports, if any. */
  readonly metaContexts?: MetaContexts;
}
