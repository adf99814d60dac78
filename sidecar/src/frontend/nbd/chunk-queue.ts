// Bytes received from a socket and not yet parsed. `take` hands out a view into the received
// chunk when the bytes lie within one chunk (the common case: no copy) and copies only when
// they straddle chunk boundaries.

export class ChunkQueue {
  private chunks: Buffer[] = [];
  private headOffset = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Removes and returns the next `n` bytes; the caller checked `length >= n`. */
  take(n: number): Buffer {
    if (n > this.length) throw new RangeError(`take(${n}) with only ${this.length} bytes queued`);
    const head = this.chunks[0];
    if (head !== undefined && head.length - this.headOffset >= n) {
      const view = head.subarray(this.headOffset, this.headOffset + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const k = Math.min(n - filled, chunk.length - this.headOffset);
      chunk.copy(out, filled, this.headOffset, this.headOffset + k);
      filled += k;
      this.advance(k);
    }
    return out;
  }

  /** Drops the next `n` bytes (or all that are queued, if fewer); returns how many were dropped. */
  skip(n: number): number {
    let dropped = 0;
    while (dropped < n && this.chunks.length > 0) {
      const k = Math.min(n - dropped, this.chunks[0].length - this.headOffset);
      this.advance(k);
      dropped += k;
    }
    return dropped;
  }

  private advance(k: number): void {
    this.headOffset += k;
    this.length -= k;
    if (this.headOffset === this.chunks[0].length) {
      this.chunks.shift();
      this.headOffset = 0;
    }
  }
}
