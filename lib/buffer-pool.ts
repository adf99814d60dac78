// Reusable payload buffers in power-of-two size classes: NBD write payloads, and replicated
// writes arriving on a secondary. Payloads are received straight into them and handed back when
// the request completes, so a stream of large writes allocates nothing: fresh multi-megabyte
// buffers per request made V8 collect garbage dozens of times a second under "external memory
// pressure".

const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB, the largest payload any of our protocols accepts

export class BufferPool {
  private readonly free: ArrayBuffer[][] = [];
  /** Backings this pool created: nothing else (Node's shared small-buffer pool!) is taken back. */
  private readonly owned = new WeakSet<ArrayBuffer>();

  /** @param maxBytesPerClass idle memory kept per size class; beyond it buffers are dropped */
  constructor(private readonly maxBytesPerClass = 64 * 1024 * 1024) {
    for (let k = 0; k <= MAX_CLASS; k++) this.free.push([]);
  }

  private static classOf(n: number): number {
    return Math.max(MIN_CLASS, 32 - Math.clz32(Math.max(n, 1) - 1));
  }

  /** A buffer of exactly `n` bytes (contents undefined), to be released once no longer used. */
  acquire(n: number): Buffer {
    const k = BufferPool.classOf(n);
    if (k > MAX_CLASS) return Buffer.allocUnsafe(n);
    let backing = this.free[k].pop();
    if (!backing) {
      backing = new ArrayBuffer(2 ** k);
      this.owned.add(backing);
    }
    return Buffer.from(backing, 0, n);
  }

  /** Returns a buffer from `acquire`. The caller must hold no other reference to it. */
  release(buf: Buffer): void {
    const backing = buf.buffer;
    if (!(backing instanceof ArrayBuffer) || !this.owned.has(backing)) return;
    const list = this.free[BufferPool.classOf(backing.byteLength)];
    if ((list.length + 1) * backing.byteLength <= this.maxBytesPerClass) list.push(backing);
  }

  /** Idle bytes held, for tests and metrics. */
  idleBytes(): number {
    return this.free.reduce((sum, list, k) => sum + list.length * 2 ** k, 0);
  }
}
