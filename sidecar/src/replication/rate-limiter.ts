// A token bucket bounding resync bandwidth so application writes keep their latency.
export class RateLimiter {
  private tokens: number;
  private last = performance.now();

  /** @param bytesPerSecond 0 disables the limit */
  constructor(private readonly bytesPerSecond: number) {
    // Up to a tenth of a second of burst.
    this.tokens = bytesPerSecond / 10;
  }

  async take(bytes: number): Promise<void> {
    if (this.bytesPerSecond <= 0) return;
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(
        this.bytesPerSecond / 10,
        this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond,
      );
      this.last = now;
      if (this.tokens >= bytes || this.tokens >= this.bytesPerSecond / 10) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = ((bytes - this.tokens) / this.bytesPerSecond) * 1000;
      await new Promise((r) => setTimeout(r, Math.max(1, Math.min(waitMs, 100))));
    }
  }
}
