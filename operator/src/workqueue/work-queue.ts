// A de-duplicating, rate-limited work queue after client-go's workqueue. Keys, not objects, are
// queued: a reconcile re-reads the world, so ten events for one object need one pass, and a key
// that changes while it is being reconciled gets exactly one more pass once that one is done.

export interface WorkQueueOptions {
  /** First retry delay after a failure; doubles with each consecutive failure. */
  baseDelayMs?: number;
  /** Longest retry delay, however many failures. */
  maxDelayMs?: number;
}

/**
 * base·2^failures capped at max, then scaled into [0.8, 1] of that: the jitter spreads the
 * retries of keys that failed together (an apiserver blip) without ever passing the cap.
 */
export function backoffDelayMs(
  failures: number,
  baseDelayMs: number,
  maxDelayMs: number,
  random: () => number = Math.random,
): number {
  // 2^failures overflows to Infinity long before failures does; min() keeps that harmless.
  const capped = Math.min(maxDelayMs, baseDelayMs * 2 ** failures);
  return capped * (0.8 + 0.2 * random());
}

export class WorkQueue {
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  /** FIFO of keys ready to hand out; each also in `dirty`, none in `processing`. */
  private readonly queue: string[] = [];
  /** Keys that need a pass: queued, or changed while processing and waiting for done(). */
  private readonly dirty = new Set<string>();
  private readonly processing = new Set<string>();
  private readonly delayed = new Map<string, { dueAt: number; timer: NodeJS.Timeout }>();
  private readonly failureCounts = new Map<string, number>();
  private waiters: Array<() => void> = [];
  private shuttingDown = false;

  constructor(options: WorkQueueOptions = {}) {
    this.baseDelayMs = options.baseDelayMs ?? 5;
    this.maxDelayMs = options.maxDelayMs ?? 60_000;
  }

  get length(): number {
    return this.queue.length;
  }

  add(key: string): void {
    if (this.shuttingDown || this.dirty.has(key)) return;
    this.dirty.add(key);
    // done() queues it: handing it out now would let two workers reconcile one key at once.
    if (this.processing.has(key)) return;
    this.queue.push(key);
    this.waiters.shift()?.();
  }

  addAfter(key: string, delayMs: number): void {
    if (this.shuttingDown) return;
    if (delayMs <= 0) {
      this.add(key);
      return;
    }
    const dueAt = Date.now() + delayMs;
    const pending = this.delayed.get(key);
    if (pending) {
      if (pending.dueAt <= dueAt) return;
      clearTimeout(pending.timer);
    }
    const timer = setTimeout(() => {
      this.delayed.delete(key);
      this.add(key);
    }, delayMs);
    // A pending retry must not keep a finished process alive.
    timer.unref();
    this.delayed.set(key, { dueAt, timer });
  }

  addRateLimited(key: string): void {
    const failures = this.failureCounts.get(key) ?? 0;
    this.failureCounts.set(key, failures + 1);
    this.addAfter(key, backoffDelayMs(failures, this.baseDelayMs, this.maxDelayMs));
  }

  forget(key: string): void {
    this.failureCounts.delete(key);
  }

  failures(key: string): number {
    return this.failureCounts.get(key) ?? 0;
  }

  async get(): Promise<string | undefined> {
    for (;;) {
      if (this.shuttingDown) return undefined;
      const key = this.queue.shift();
      if (key !== undefined) {
        this.dirty.delete(key);
        this.processing.add(key);
        return key;
      }
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  done(key: string): void {
    this.processing.delete(key);
    if (this.dirty.has(key) && !this.shuttingDown) {
      this.queue.push(key);
      this.waiters.shift()?.();
    }
  }

  shutDown(): void {
    this.shuttingDown = true;
    for (const { timer } of this.delayed.values()) clearTimeout(timer);
    this.delayed.clear();
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }
}
