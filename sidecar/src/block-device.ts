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

export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
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
}
