// Catch-up of one peer while the workload keeps writing: copy every dirty region (holding its
// region lock, so no live write interleaves with the copy), rate-limited, a few regions in
// flight; clear a region's bit only once the peer acknowledged it. Zero regions travel as ZERO
// ops, so holes cost a few bytes on the wire.
//
// The work follows the data, never the volume size. Dirty regions the allocation map knows were
// never written are settled in bulk, a bitmap word and a map word at a time: a fresh peer
// already reads zeroes there, any other gets a few large ZERO ops. And the event loop is shared
// by every volume of the agent: a scan gives it back every few milliseconds, even when all it
// awaits is already settled.
import { createHash } from 'node:crypto';
import { LockstepError } from '../../../lib/errors';
import { FileBlockDevice } from '../store/file-device';
import type { AllocationMap } from '../store/allocation-map';
import type { VolumeTracking } from '../tracking/volume-tracking';
import { OpFlag, OpKind } from './frames';
import type { PeerLink } from './peer-link';
import { RateLimiter } from './rate-limiter';

/** The peer a scan copies to: its ops, its checksums, and where the scan reports progress. */
export interface ResyncTarget {
  readonly address: string;
  send: PeerLink['send'];
  regionChecksums: PeerLink['regionChecksums'];
  /** `bytes` more of what the scan must cover are settled. */
  scanned(bytes: number): void;
  /** `bytes` of data (not zero runs) went to the peer. */
  sentData(bytes: number): void;
}

/** What a copy pass reads: the local copy (around the page cache), or a snapshot of it. */
export interface ScanData {
  readonly allocation: Pick<AllocationMap, 'nextWritten' | 'nextUnwritten'>;
  readForScan(offset: number, target: Buffer): Promise<void>;
  alignedBuffer(): Promise<Buffer>;
  releaseAlignedBuffer(buf: Buffer): boolean;
}

/** Which regions a copy pass still owes each peer; it clears them as the peer acknowledges. */
export type ScanPlan = Pick<VolumeTracking, 'bitmap' | 'clearRange'>;

/** This side of a copy pass: what it reads, its plan, and regions held off live writes. */
export interface ScanSource {
  readonly sizeBytes: number;
  readonly regionSize: number;
  readonly maxResyncBytesPerSecond: number;
  readonly local: ScanData;
  readonly tracking: ScanPlan;
  /**
   * Runs `work` with regions [first, last] held against live writes, after the ops on them
   * still on their way to the peers: a copy made inside reaches the peer after them.
   */
  withRegionsLocked<T>(first: number, last: number, work: () => Promise<T>): Promise<T>;
}

/** This side of a resync: the local copy, read directly, and the peers' tracking. */
export interface ResyncSource extends ScanSource {
  readonly local: FileBlockDevice;
  /** The peers' bitmaps: read here, changed only through it (their one writer). */
  readonly tracking: VolumeTracking;
}

/**
 * Ops in flight at once: 8, as ever, plus up to 64 in all of copies of at most 16 KiB. A
 * cutover's remainder is one 4 KiB run per block a workload wrote since the last round: 8 at a
 * time, it went out at ~3 MB/s and the workload outran it.
 */
const WINDOW = 8;
const SMALL_WINDOW = 64;
const SMALL_COPY_BYTES = 16 * 1024;
const zeroes = Buffer.alloc(4 * 1024 * 1024);

/** Consecutive dirty regions copied as one unit: one lock, one read, few ops. */
const RUN_BYTES = 1024 * 1024;
/**
 * Regions one step of a scan looks at: a step's bitmap and allocation searches and its bulk
 * clear cover at most 32 Ki words each, well under a millisecond.
 */
const STEP_REGIONS = 1 << 20;
/**
 * A never-written stretch reaches a peer that is not fresh as ZERO ops. Their size adapts to how
 * fast the peer answers them: a peer whose own allocation map knows the range is empty answers
 * at once, and a few thousand ops cover terabytes; one that holds data there, or must read the
 * range to know (its map is unknown), gets ops small enough to answer well within the ack
 * deadline. What is in flight is bounded in bytes too, since a fast answer says nothing about
 * the next range.
 */
const ZERO_OP_MIN_BYTES = 64 * 1024 * 1024;
const ZERO_OP_MAX_BYTES = 1024 * 1024 * 1024;
const ZERO_IN_FLIGHT_BYTES = 2 * ZERO_OP_MAX_BYTES;
const ZERO_OP_TARGET_MS = 100;
/** How long a scan keeps the event loop before letting I/O callbacks run. */
const SLICE_MS = 4;

/** Regions one RegionChecksums call may cover; its `listed` bitmap is 128 KiB at most. */
export const CHECKSUM_SPAN = 1 << 20;
/** Bytes the secondary reads for one RegionChecksums call, so each answers within its deadline. */
const CHECKSUM_READ_BYTES = 16 * 1024 * 1024;
const DIGEST_BYTES = 16;

function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += zeroes.length) {
    const n = Math.min(zeroes.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(zeroes.subarray(0, n))) return false;
  }
  return true;
}

export function regionDigest(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest().subarray(0, DIGEST_BYTES);
}

/**
 * A loop's pause point: resolves at once until SLICE_MS have passed since the last pause, then
 * on the next turn of the event loop (after pending I/O). Awaiting settled promises alone never
 * lets sockets be served.
 */
function pacer(): () => Promise<void> | undefined {
  let since = performance.now();
  return () => {
    if (performance.now() - since < SLICE_MS) return undefined;
    return new Promise((resolve) =>
      setImmediate(() => {
        since = performance.now();
        resolve();
      }),
    );
  };
}

/** Region geometry of one volume: byte ranges of region indexes, clipped to the volume. */
class Regions {
  readonly count: number;

  constructor(
    readonly regionSize: number,
    readonly volumeSize: number,
  ) {
    this.count = Math.ceil(volumeSize / regionSize);
  }

  start(region: number): number {
    return region * this.regionSize;
  }

  /** The byte after the last byte of `region`. */
  end(region: number): number {
    return Math.min((region + 1) * this.regionSize, this.volumeSize);
  }

  /** The region holding byte `at` of a stretch ending at `end`; `limit` when at === end. */
  of(at: number, end: number, limit: number): number {
    return at === end ? limit : Math.floor(at / this.regionSize);
  }
}

/**
 * Clears, among regions [first, last], those whose every extent is still never written. Called
 * when a peer is known to read zeroes there (fresh, or a ZERO op acknowledged), in one
 * synchronous step: a live write that landed since leaves its regions dirty for the copy pass,
 * and one yet to land is already on its way to the peer (a write is sent before, or in the same
 * turn as, the allocation map learns of it), so it arrives after the zeroes.
 */
function clearUnwritten(
  link: ResyncTarget,
  host: ScanSource,
  g: Regions,
  first: number,
  last: number,
): void {
  const allocation = host.local.allocation;
  const end = g.end(last);
  for (let pos = g.start(first); pos < end;) {
    const data = allocation.nextWritten(pos, end);
    const from = Math.ceil(pos / g.regionSize);
    const to = data === end ? last : Math.floor(data / g.regionSize) - 1;
    if (to >= from) host.tracking.clearRange(link.address, from, to);
    if (data === end) return;
    pos = allocation.nextUnwritten(data, end);
  }
}

async function copyRun(
  link: ResyncTarget,
  host: ScanSource,
  g: Regions,
  first: number,
  last: number,
  limiter: RateLimiter,
  opts: ResyncOptions,
): Promise<void> {
  // Under the regions' lock, after any async write on them still on its way: the copy reads
  // what is here now, so it must reach the peer after that write, not be overwritten by it.
  await host.withRegionsLocked(first, last, async () => {
    const start = g.start(first);
    const end = g.end(last);
    // A pooled buffer the direct read fills in place; the lanes send from it, so it goes back
    // only once every op of the run is settled.
    const pooled = end - start <= FileBlockDevice.alignedBufferBytes;
    const buf = pooled ? await host.local.alignedBuffer() : Buffer.allocUnsafe(end - start);
    try {
      const data = buf.subarray(0, end - start);
      await host.local.readForScan(start, data);
      await sendRun(link, g, first, last, start, data, limiter, opts);
    } finally {
      if (pooled) host.local.releaseAlignedBuffer(buf);
    }
    host.tracking.clearRange(link.address, first, last);
    link.scanned(end - start);
  });
}

/** Sends a run read into `data` (from byte `start`): zero stretches as ZERO ops, the rest as writes. */
async function sendRun(
  link: ResyncTarget,
  g: Regions,
  first: number,
  last: number,
  start: number,
  data: Buffer,
  limiter: RateLimiter,
  opts: ResyncOptions,
): Promise<void> {
  // Maximal stretches of zero or non-zero regions: a hole of any length is one small op.
  const sends: Promise<void>[] = [];
  let segStart = first;
  let segZero = isZero(data.subarray(0, g.end(first) - g.start(first)));
  const flushSegment = async (segEnd: number) => {
    const off = g.start(segStart);
    const len = g.end(segEnd) - off;
    if (segZero) {
      if (!opts.peerIsZero)
        sends.push(link.send(OpKind.ZERO, off, len, undefined, OpFlag.BULK, 'spread'));
    } else {
      await limiter.take(len);
      sends.push(
        link.send(
          OpKind.WRITE,
          off,
          len,
          data.subarray(off - start, off - start + len),
          OpFlag.BULK,
          'spread',
        ),
      );
      link.sentData(len);
    }
  };
  for (let r = first + 1; r <= last; r++) {
    const zero = isZero(data.subarray(g.start(r) - start, g.end(r) - start));
    if (zero !== segZero) {
      await flushSegment(r - 1);
      segStart = r;
      segZero = zero;
    }
  }
  await flushSegment(last);
  const failed = (await Promise.allSettled(sends)).find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/**
 * Zeroes never-written regions [first, last] on a peer that may hold data there; resolves with
 * how long the peer took, in ms.
 */
async function zeroRun(
  link: ResyncTarget,
  host: ScanSource,
  g: Regions,
  first: number,
  last: number,
): Promise<number> {
  const start = g.start(first);
  const t0 = performance.now();
  await link.send(OpKind.ZERO, start, g.end(last) - start, undefined, OpFlag.BULK, 'spread');
  clearUnwritten(link, host, g, first, last);
  link.scanned(g.end(last) - start);
  return performance.now() - t0;
}

export interface ResyncOptions {
  /**
   * The peer's copy reads as zeroes wherever it was not written since it was created (a baseline
   * to a copy the handshake found fresh): zero regions are then not sent at all. Live writes reach
   * it while the scan runs, and a region is copied under its lock (or cleared as never written,
   * see clearUnwritten), so whatever the scan takes for zero is zero on the peer too.
   */
  peerIsZero: boolean;
}

/** Copies dirty regions until none is left; throws if the link fails. */
export async function resyncDirtyRegions(
  link: ResyncTarget,
  host: ScanSource,
  cancelled: () => boolean,
  opts: ResyncOptions = { peerIsZero: false },
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  const allocation = host.local.allocation;
  const g = new Regions(host.regionSize, host.sizeBytes);
  const limiter = new RateLimiter(host.maxResyncBytesPerSecond);
  const runRegions = Math.max(1, Math.floor(RUN_BYTES / host.regionSize));
  let zeroBytes = ZERO_OP_MIN_BYTES;
  let zeroing = 0;
  // How far one step looks: a fresh peer's never-written stretches are cleared a step at a time,
  // anyone else's are taken an op at a time.
  const stepRegions = opts.peerIsZero
    ? STEP_REGIONS
    : Math.max(runRegions, Math.ceil(ZERO_OP_MAX_BYTES / host.regionSize));
  const pause = pacer();
  const inFlight = new Set<Promise<void>>();
  let large = 0;
  let failure: unknown;
  const launch = async (work: Promise<void>, small = false) => {
    if (!small) large++;
    const done = () => {
      inFlight.delete(p);
      if (!small) large--;
    };
    const p: Promise<void> = work.then(done, (err: unknown) => {
      done();
      failure ??= err;
    });
    inFlight.add(p);
    while (large >= WINDOW || inFlight.size >= SMALL_WINDOW) await Promise.race(inFlight);
  };
  // Regions can turn dirty again behind the scan (a live write failed); scan until clean.
  while (bitmap.dirtyRegions > 0 && failure === undefined) {
    for (let region = bitmap.nextDirty(0); region !== -1 && failure === undefined;) {
      await pause();
      if (cancelled()) return;
      // Where data starts (within one step), then the dirty run from `region`, searched only
      // as far as this step consumes it.
      const stepEnd = Math.min(g.count, region + stepRegions);
      const stepByte = g.end(stepEnd - 1);
      const data = g.of(allocation.nextWritten(g.start(region), stepByte), stepByte, stepEnd);
      const dirtyUpTo = (limit: number) => {
        const clean = bitmap.nextClean(region, limit);
        return (clean === -1 ? limit : clean) - 1;
      };
      let last: number;
      if (data === region) {
        last = dirtyUpTo(Math.min(stepEnd, region + runRegions));
        await launch(
          copyRun(link, host, g, region, last, limiter, opts),
          g.end(last) - g.start(region) <= SMALL_COPY_BYTES,
        );
      } else if (opts.peerIsZero) {
        last = dirtyUpTo(data);
        const bytes = g.end(last) - g.start(region);
        clearUnwritten(link, host, g, region, last);
        link.scanned(bytes);
      } else if (zeroing > 0 && zeroing + zeroBytes > ZERO_IN_FLIGHT_BYTES) {
        // Looked at again once an op is answered: what was never written may be written by then.
        await Promise.race(inFlight);
        continue;
      } else {
        last = dirtyUpTo(
          Math.min(data, region + Math.max(1, Math.floor(zeroBytes / g.regionSize))),
        );
        const bytes = g.end(last) - g.start(region);
        zeroing += bytes;
        const zeroed = zeroRun(link, host, g, region, last).then(
          (ms) => {
            zeroing -= bytes;
            if (ms < ZERO_OP_TARGET_MS / 2) zeroBytes = Math.min(ZERO_OP_MAX_BYTES, zeroBytes * 2);
            else if (ms > ZERO_OP_TARGET_MS * 2)
              zeroBytes = Math.max(ZERO_OP_MIN_BYTES, zeroBytes / 2);
          },
          (err: unknown) => {
            zeroing -= bytes;
            throw err;
          },
        );
        await launch(zeroed);
      }
      region = bitmap.nextDirty(last + 1);
    }
    await Promise.all(inFlight);
  }
  if (failure !== undefined) throw failure instanceof Error ? failure : new Error('resync failed');
}

/** What a secondary answers for regions [first, endRegion): see RegionChecksumsResponse. */
export interface RegionDigests {
  digests: Buffer;
  endRegion: number;
  listed: Buffer;
}

function isListed(listed: Buffer, i: number): boolean {
  return (((listed[i >> 3] ?? 0) >> (i & 7)) & 1) === 1;
}

/** The first listed index in [from, end), or `end`; skips a byte (8 regions) per step. */
function nextListed(listed: Buffer, from: number, end: number): number {
  for (let i = from; i < end;) {
    if ((listed[i >> 3] ?? 0) >> (i & 7) === 0) i = (i | 7) + 1;
    else if (isListed(listed, i)) return i;
    else i++;
  }
  return end;
}

/**
 * The secondary's side of a checksum comparison: digests of the regions in [first, first +
 * count) that may hold data here, reading at most CHECKSUM_READ_BYTES (the answer then stops
 * short). Regions never written are not read, only left out of `listed`.
 */
export async function listRegionDigests(
  device: FileBlockDevice,
  regionSize: number,
  first: number,
  count: number,
): Promise<RegionDigests> {
  const g = new Regions(regionSize, device.size);
  const runRegions = Math.max(1, Math.floor(RUN_BYTES / regionSize));
  const stop = first + count;
  const endByte = g.end(stop - 1);
  const listed = Buffer.alloc(Math.ceil(count / 8));
  const digests: Buffer[] = [];
  let read = 0;
  let region = first;
  while (region < stop && read < CHECKSUM_READ_BYTES) {
    const at = device.allocation.nextWritten(g.start(region), endByte);
    region = g.of(at, endByte, stop);
    if (region === stop) break;
    // Consecutive regions holding data, read at once.
    const dataEnd = device.allocation.nextUnwritten(at, endByte);
    const last = Math.min(stop - 1, region + runRegions - 1, Math.ceil(dataEnd / regionSize) - 1);
    const data = Buffer.allocUnsafe(g.end(last) - g.start(region));
    await device.readForScan(g.start(region), data);
    for (let r = region; r <= last; r++) {
      const from = g.start(r) - g.start(region);
      digests.push(regionDigest(data.subarray(from, from + g.end(r) - g.start(r))));
      listed[(r - first) >> 3] |= 1 << ((r - first) & 7);
    }
    read += data.length;
    region = last + 1;
  }
  return { digests: Buffer.concat(digests), endRegion: region, listed };
}

/** Marks dirty every region whose checksum differs between the two copies. */
export async function markDifferingRegions(
  link: ResyncTarget,
  host: ResyncSource,
  cancelled: () => boolean,
): Promise<void> {
  const allocation = host.local.allocation;
  const g = new Regions(host.regionSize, host.sizeBytes);
  const runRegions = Math.max(1, Math.floor(RUN_BYTES / host.regionSize));
  const zeroDigests = new Map<number, Buffer>();
  const zeroDigest = (length: number) => {
    let d = zeroDigests.get(length);
    if (!d) zeroDigests.set(length, (d = regionDigest(Buffer.alloc(length))));
    return d;
  };
  const pause = pacer();
  for (let first = 0; first < g.count;) {
    if (cancelled()) return;
    const count = Math.min(CHECKSUM_SPAN, g.count - first);
    const answer = await link.regionChecksums(first, count);
    const stop = answer.endRegion;
    if (!(stop > first && stop <= first + count)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `peer ${link.address} answered a checksum request for regions ${first}+${count} with ` +
          `regions up to ${stop} (an agent from before sparse checksum answers? upgrade it)`,
      );
    }
    const endByte = g.end(stop - 1);
    let listedSeen = 0;
    // Only regions that hold data on either side are compared: the rest are zeroes on both.
    for (let region = first; region < stop;) {
      await pause();
      if (cancelled()) return;
      const local = g.of(allocation.nextWritten(g.start(region), endByte), endByte, stop);
      region = Math.min(local, first + nextListed(answer.listed, region - first, stop - first));
      if (region === stop) break;
      const last = Math.min(stop - 1, region + runRegions - 1);
      const data = Buffer.allocUnsafe(g.end(last) - g.start(region));
      await host.local.readForScan(g.start(region), data);
      for (let r = region; r <= last; r++) {
        const length = g.end(r) - g.start(r);
        let remote: Buffer;
        if (isListed(answer.listed, r - first)) {
          const at = listedSeen++ * DIGEST_BYTES;
          remote = answer.digests.subarray(at, at + DIGEST_BYTES);
        } else if (allocation.mayHoldData(g.start(r), length)) remote = zeroDigest(length);
        else continue;
        const from = g.start(r) - g.start(region);
        if (!regionDigest(data.subarray(from, from + length)).equals(remote))
          host.tracking.markDirty(link.address, g.start(r), length);
      }
      region = last + 1;
    }
    if (listedSeen * DIGEST_BYTES !== answer.digests.length) {
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `peer ${link.address} listed ${listedSeen} regions but sent ` +
          `${answer.digests.length / DIGEST_BYTES} digests; the link is dropped and retried`,
      );
    }
    link.scanned(endByte - g.start(first));
    first = stop;
  }
}
