// Catch-up of one peer while the workload keeps writing: copy every dirty region (holding its
// region lock, so no live write interleaves with the copy), rate-limited, a few regions in
// flight; clear a region's bit only once the peer acknowledged it. Zero regions travel as ZERO
// ops, so holes cost a few bytes on the wire.
import { createHash } from 'node:crypto';
import { FileBlockDevice } from '../store/file-device';
import { OpFlag, OpKind } from './frames';
import type { PeerHost } from './peer-host';
import type { PeerLink } from './peer-link';
import { RateLimiter } from './rate-limiter';

const WINDOW = 8;
const CHECKSUM_BATCH = 256;
const zeroes = Buffer.alloc(4 * 1024 * 1024);

function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += zeroes.length) {
    const n = Math.min(zeroes.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(zeroes.subarray(0, n))) return false;
  }
  return true;
}

export function regionDigest(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest().subarray(0, 16);
}

/** Consecutive dirty regions copied as one unit: one lock, one read, few ops. */
const RUN_BYTES = 1024 * 1024;

async function copyRun(
  link: PeerLink,
  host: PeerHost,
  first: number,
  last: number,
  limiter: RateLimiter,
  opts: ResyncOptions,
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  // Under the regions' lock, after any async write on them still on its way: the copy reads
  // what is here now, so it must reach the peer after that write, not be overwritten by it.
  await host.withRegionsLocked(first, last, async () => {
    const start = bitmap.regionRange(first).offset;
    const end = bitmap.regionRange(last).offset + bitmap.regionRange(last).length;
    // A pooled buffer the direct read fills in place; the lanes send from it, so it goes back
    // only once every op of the run is settled.
    const pooled = end - start <= FileBlockDevice.alignedBufferBytes;
    const buf = pooled ? await host.local.alignedBuffer() : Buffer.allocUnsafe(end - start);
    try {
      const data = buf.subarray(0, end - start);
      await host.local.readForScan(start, data);
      await sendRun(link, host, first, last, start, data, limiter, opts);
    } finally {
      if (pooled) host.local.releaseAlignedBuffer(buf);
    }
    for (let r = first; r <= last; r++) host.tracking.clearRegion(link.address, r);
    if (link.resync) link.resync.doneBytes += end - start;
  });
}

/** Sends a run read into `data` (from byte `start`): zero stretches as ZERO ops, the rest as writes. */
async function sendRun(
  link: PeerLink,
  host: PeerHost,
  first: number,
  last: number,
  start: number,
  data: Buffer,
  limiter: RateLimiter,
  opts: ResyncOptions,
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  // Maximal stretches of zero or non-zero regions: a hole of any length is one small op.
  const sends: Promise<void>[] = [];
  let segStart = first;
  let segZero = isZero(data.subarray(0, bitmap.regionRange(first).length));
  const flushSegment = async (segEnd: number) => {
    const off = bitmap.regionRange(segStart).offset;
    const len = bitmap.regionRange(segEnd).offset + bitmap.regionRange(segEnd).length - off;
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
      link.resyncBytesSent += len;
    }
  };
  for (let r = first + 1; r <= last; r++) {
    const { offset, length } = bitmap.regionRange(r);
    const zero = isZero(data.subarray(offset - start, offset - start + length));
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

export interface ResyncOptions {
  /**
   * The peer's copy reads as zeroes wherever it was not written since it was created (a baseline
   * to a copy the handshake created): zero regions are then not sent at all. Live writes reach
   * it while the scan runs, and a region is scanned under its lock, so whatever the scan reads
   * as zero is zero on the peer too.
   */
  peerIsZero: boolean;
}

/** Copies dirty regions until none is left; throws if the link fails. */
export async function resyncDirtyRegions(
  link: PeerLink,
  host: PeerHost,
  cancelled: () => boolean,
  opts: ResyncOptions = { peerIsZero: false },
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  const limiter = new RateLimiter(host.maxResyncBytesPerSecond);
  const runRegions = Math.max(1, Math.floor(RUN_BYTES / host.regionSize));
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  // Regions can turn dirty again behind the scan (a live write failed); scan until clean.
  while (bitmap.dirtyRegions > 0 && failure === undefined) {
    for (let region = bitmap.nextDirty(0); region !== -1 && failure === undefined;) {
      if (cancelled()) return;
      let last = region;
      while (
        last + 1 < bitmap.regionCount &&
        last - region + 1 < runRegions &&
        bitmap.isDirty(last + 1)
      )
        last++;
      const p: Promise<void> = copyRun(link, host, region, last, limiter, opts).then(
        () => {
          inFlight.delete(p);
        },
        (err: unknown) => {
          inFlight.delete(p);
          failure ??= err;
        },
      );
      inFlight.add(p);
      if (inFlight.size >= WINDOW) await Promise.race(inFlight);
      region = last + 1 < bitmap.regionCount ? bitmap.nextDirty(last + 1) : -1;
    }
    await Promise.all(inFlight);
  }
  if (failure !== undefined) throw failure instanceof Error ? failure : new Error('resync failed');
}

/** Marks dirty every region whose checksum differs between the two copies. */
export async function markDifferingRegions(
  link: PeerLink,
  host: PeerHost,
  cancelled: () => boolean,
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  const regions = bitmap.regionCount;
  for (let first = 0; first < regions; first += CHECKSUM_BATCH) {
    if (cancelled()) return;
    const count = Math.min(CHECKSUM_BATCH, regions - first);
    const remote = await link.regionChecksums(first, count);
    for (let i = 0; i < count; i++) {
      const { offset, length } = bitmap.regionRange(first + i);
      const data = Buffer.allocUnsafe(length);
      await host.local.readForScan(offset, data);
      if (!regionDigest(data).equals(remote.subarray(i * 16, i * 16 + 16)))
        bitmap.markRegion(first + i);
      if (link.resync) link.resync.doneBytes += length;
    }
  }
}
