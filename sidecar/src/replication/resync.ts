// Catch-up of one peer while the workload keeps writing: copy every dirty region (holding its
// region lock, so no live write interleaves with the copy), rate-limited, a few regions in
// flight; clear a region's bit only once the peer acknowledged it. Zero regions travel as ZERO
// ops, so holes cost a few bytes on the wire.
import { createHash } from 'node:crypto';
import { OpKind } from './frames';
import type { PeerHost } from './peer-host';
import type { PeerLink } from './peer-link';
import { RateLimiter } from './rate-limiter';

const WINDOW = 16;
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

async function copyRegion(
  link: PeerLink,
  host: PeerHost,
  region: number,
  limiter: RateLimiter,
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  const wait = host.locks.acquire(region, region);
  if (wait) await wait;
  try {
    if (!bitmap.isDirty(region)) return;
    const { offset, length } = bitmap.regionRange(region);
    const data = Buffer.allocUnsafe(length);
    await host.local.read(offset, data);
    if (isZero(data)) {
      await link.send(OpKind.ZERO, offset, length, undefined, false);
    } else {
      await limiter.take(length);
      await link.send(OpKind.WRITE, offset, length, data, false);
      link.resyncBytesSent += length;
    }
    host.tracking.clearRegion(link.address, region);
    if (link.resync) link.resync.doneBytes += length;
  } finally {
    host.locks.release(region, region);
  }
}

/** Copies dirty regions until none is left; throws if the link fails. */
export async function resyncDirtyRegions(
  link: PeerLink,
  host: PeerHost,
  cancelled: () => boolean,
): Promise<void> {
  const bitmap = host.tracking.bitmap(link.address);
  const limiter = new RateLimiter(host.maxResyncBytesPerSecond);
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  // Regions can turn dirty again behind the scan (a live write failed); scan until clean.
  while (bitmap.dirtyRegions > 0 && failure === undefined) {
    for (
      let region = bitmap.nextDirty(0);
      region !== -1 && failure === undefined;
      region = bitmap.nextDirty(region + 1)
    ) {
      if (cancelled()) return;
      const p: Promise<void> = copyRegion(link, host, region, limiter).then(
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
    }
    await Promise.all(inFlight);
  }
  if (failure !== undefined) throw failure;
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
      await host.local.read(offset, data);
      if (!regionDigest(data).equals(remote.subarray(i * 16, i * 16 + 16)))
        bitmap.markRegion(first + i);
      if (link.resync) link.resync.doneBytes += length;
    }
  }
}
