// Writes of several buffers at one position that write every byte or fail. A short write of a
// regular file only happens when the disk is full: it fails as ENOSPC.
import fs from 'node:fs';

/**
 * Up to this size a write is a few-microsecond copy into the page cache, cheaper on the event
 * loop than a trip through the thread pool (which a client's write would wait for).
 */
const SYNC_WRITE_MAX = 64 * 1024 + 4096;

function shortWrite(n: number, total: number): NodeJS.ErrnoException {
  const err = new Error(`short write (${n} of ${total} bytes)`) as NodeJS.ErrnoException;
  err.code = 'ENOSPC';
  return err;
}

/** Writes `buffers` at `position`: on the event loop when small, else on the thread pool. */
export function writeWhole(fd: number, buffers: Buffer[], position: number): Promise<void> {
  const total = buffers.reduce((s, b) => s + b.length, 0);
  if (total <= SYNC_WRITE_MAX) {
    let n: number;
    try {
      n = fs.writevSync(fd, buffers, position);
    } catch (err) {
      return Promise.reject(err instanceof Error ? err : new Error(String(err)));
    }
    return n === total ? Promise.resolve() : Promise.reject(shortWrite(n, total));
  }
  return new Promise((resolve, reject) =>
    fs.writev(fd, buffers, position, (err, n) => {
      if (err) return reject(err);
      if (n !== total) return reject(shortWrite(n, total));
      resolve();
    }),
  );
}
