// Protocol elements (headers, small payloads) that may arrive split across socket reads. The
// common case costs nothing: an element wholly inside the read is handed out as a view of it.
// Only an element that straddles reads is copied, piece by piece, into a private buffer.

export class ElementCollector {
  private carry = Buffer.allocUnsafe(64);
  private filled = 0;
  /** Bytes of the read consumed by the last `take`. */
  used = 0;

  /**
   * Offers buf[off, end) towards an element of `need` bytes. Returns the element once complete
   * (valid only until the next read), else undefined; `used` says how many bytes were taken.
   */
  take(need: number, buf: Buffer, off: number, end: number): Buffer | undefined {
    if (this.filled === 0 && end - off >= need) {
      this.used = need;
      return buf.subarray(off, off + need);
    }
    if (this.carry.length < need) {
      const bigger = Buffer.allocUnsafe(need);
      this.carry.copy(bigger, 0, 0, this.filled);
      this.carry = bigger;
    }
    const k = Math.min(need - this.filled, end - off);
    buf.copy(this.carry, this.filled, off, off + k);
    this.filled += k;
    this.used = k;
    if (this.filled < need) return undefined;
    this.filled = 0;
    return this.carry.subarray(0, need);
  }
}
