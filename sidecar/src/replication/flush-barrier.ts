// "Every op received before this FLUSH has finished", without a promise per op: ops are
// counted per span, a FLUSH closes the current span and waits until it and every earlier one
// have drained. Ops finish out of order, so a single counter could not tell older from newer.

export class FlushBarrier {
  /** Ops still running, per span; counts[0] is span `base`. */
  private readonly counts: number[] = [0];
  private base = 0;
  /** waiters[i] wakes when every span up to `base + i` has drained. */
  private readonly waiters: ((() => void) | undefined)[] = [];

  /** An op starts; pass the returned span to `end`. */
  begin(): number {
    this.counts[this.counts.length - 1]++;
    return this.base + this.counts.length - 1;
  }

  end(span: number): void {
    this.counts[span - this.base]--;
    this.drain();
  }

  /** Resolves once every op begun before this call has ended. */
  barrier(): Promise<void> {
    if (this.counts.length === 1 && this.counts[0] === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiters[this.counts.length - 1] = resolve;
      this.counts.push(0);
    });
  }

  private drain(): void {
    while (this.counts.length > 1 && this.counts[0] === 0) {
      this.counts.shift();
      this.base++;
      this.waiters.shift()?.();
    }
  }
}
