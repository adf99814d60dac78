// The work queue and controller loop: keys are de-duplicated, a key is never reconciled twice at
// once, failures back off per key, and shutdown unblocks everyone.
import pino from 'pino';
import { runControllerLoop } from '../../operator/src/workqueue/controller-loop';
import { backoffDelayMs, WorkQueue } from '../../operator/src/workqueue/work-queue';
import { ControllerMetrics } from '../../operator/src/metrics';

const log = pino({ level: 'silent' });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Resolves with get()'s key, or null if it has not settled within `ms`. */
async function getWithin(queue: WorkQueue, ms: number): Promise<string | undefined | null> {
  return Promise.race([queue.get(), sleep(ms).then(() => null)]);
}

describe('WorkQueue', () => {
  it('holds a key once however often it is added, in FIFO order', async () => {
    const q = new WorkQueue();
    q.add('a');
    q.add('b');
    q.add('a');
    expect(q.length).toBe(2);
    expect(await q.get()).toBe('a');
    expect(await q.get()).toBe('b');
    expect(q.length).toBe(0);
  });

  it('re-queues a key added while it is processed only once done() is called', async () => {
    const q = new WorkQueue();
    q.add('a');
    const key = await q.get();
    q.add('a');
    q.add('a');
    expect(q.length).toBe(0);
    expect(await getWithin(q, 20)).toBeNull();
    q.done(key!);
    expect(q.length).toBe(1);
    expect(await q.get()).toBe('a');
    q.done('a');
    expect(q.length).toBe(0);
  });

  it('hands a key to a waiting get() as soon as it is added', async () => {
    const q = new WorkQueue();
    const waiting = q.get();
    q.add('x');
    expect(await waiting).toBe('x');
  });

  it('adds after a delay, the earliest of several delays winning', async () => {
    const q = new WorkQueue();
    const t0 = Date.now();
    q.addAfter('a', 300);
    q.addAfter('a', 40);
    q.addAfter('a', 200);
    expect(q.length).toBe(0);
    expect(await q.get()).toBe('a');
    const waited = Date.now() - t0;
    expect(waited).toBeGreaterThanOrEqual(35);
    expect(waited).toBeLessThan(150);
    q.done('a');
    // The later timers were replaced, not left to fire.
    expect(await getWithin(q, 350)).toBeNull();
  });

  it('grows the backoff exponentially with jitter and caps it', () => {
    const [low, high] = [() => 0, () => 0.999999];
    for (let n = 0; n < 5; n++) {
      expect(backoffDelayMs(n, 5, 1000, high)).toBeCloseTo(5 * 2 ** n, 3);
      expect(backoffDelayMs(n, 5, 1000, low)).toBeCloseTo(0.8 * 5 * 2 ** n, 3);
    }
    expect(backoffDelayMs(8, 5, 1000, high)).toBeCloseTo(1000, 3);
    expect(backoffDelayMs(5000, 5, 1000, high)).toBeCloseTo(1000, 3);
    expect(backoffDelayMs(5000, 5, 1000, low)).toBeCloseTo(800, 3);
  });

  it('counts failures per key, backs off longer each time, and forgets on request', async () => {
    const q = new WorkQueue({ baseDelayMs: 20, maxDelayMs: 80 });
    const retryAfter = async (): Promise<number> => {
      const t0 = Date.now();
      q.addRateLimited('k');
      expect(await q.get()).toBe('k');
      q.done('k');
      return Date.now() - t0;
    };
    const delays = [];
    for (let i = 0; i < 4; i++) delays.push(await retryAfter());
    expect(q.failures('k')).toBe(4);
    expect(q.failures('other')).toBe(0);
    // 20, 40, 80, 80 ms nominal; each at least 0.8 of that.
    expect(delays[0]).toBeGreaterThanOrEqual(15);
    expect(delays[1]).toBeGreaterThanOrEqual(31);
    expect(delays[2]).toBeGreaterThanOrEqual(63);
    expect(delays[3]).toBeGreaterThanOrEqual(63);
    expect(delays[3]).toBeLessThan(160);
    q.forget('k');
    expect(q.failures('k')).toBe(0);
    expect(await retryAfter()).toBeLessThan(60);
  });

  it('unblocks every get() on shutDown, and ignores adds and pending retries after it', async () => {
    const q = new WorkQueue();
    const waiting = [q.get(), q.get()];
    q.addAfter('later', 30);
    q.shutDown();
    expect(await Promise.all(waiting)).toEqual([undefined, undefined]);
    q.add('a');
    await sleep(50);
    expect(q.length).toBe(0);
    expect(await q.get()).toBeUndefined();
  });
});

describe('runControllerLoop', () => {
  it('never reconciles one key twice at once, yet runs different keys in parallel', async () => {
    const q = new WorkQueue();
    const active = new Map<string, number>();
    let maxPerKey = 0;
    let maxOverall = 0;
    let passes = 0;
    const reconcile = async (key: string) => {
      active.set(key, (active.get(key) ?? 0) + 1);
      maxPerKey = Math.max(maxPerKey, active.get(key)!);
      maxOverall = Math.max(
        maxOverall,
        [...active.values()].reduce((a, b) => a + b, 0),
      );
      passes++;
      await sleep(5);
      active.set(key, active.get(key)! - 1);
    };
    const loop = runControllerLoop(q, reconcile, { name: 't', workers: 8, log });
    for (let round = 0; round < 20; round++) {
      for (const key of ['a', 'b', 'c']) q.add(key);
      await sleep(2);
    }
    await sleep(50);
    q.shutDown();
    await loop;
    expect(maxPerKey).toBe(1);
    expect(maxOverall).toBeGreaterThan(1);
    // De-duplication: far fewer passes than the 60 adds, but the last add always gets one.
    expect(passes).toBeLessThan(60);
  });

  it('retries a failing key with backoff, then forgets its failures after a success', async () => {
    const q = new WorkQueue({ baseDelayMs: 10, maxDelayMs: 1000 });
    const metrics = new ControllerMetrics();
    const times: number[] = [];
    let failuresSeenOnSuccess = -1;
    const errors: unknown[] = [];
    const logged = pino(
      { level: 'error' },
      { write: (line: string) => errors.push(JSON.parse(line)) },
    );
    const loop = runControllerLoop(
      q,
      (key) => {
        times.push(Date.now());
        if (times.length <= 3) return Promise.reject(new Error('apiserver said no'));
        failuresSeenOnSuccess = q.failures(key);
        return Promise.resolve();
      },
      { name: 'retry', workers: 2, log: logged, metrics },
    );
    q.add('ns/x');
    await sleep(300);
    q.shutDown();
    await loop;
    expect(times).toHaveLength(4);
    const gaps = times.slice(1).map((t, i) => t - times[i]);
    expect(gaps[0]).toBeGreaterThanOrEqual(7);
    expect(gaps[1]).toBeGreaterThanOrEqual(15);
    expect(gaps[2]).toBeGreaterThanOrEqual(31);
    expect(failuresSeenOnSuccess).toBe(3);
    expect(q.failures('ns/x')).toBe(0);
    expect(errors).toHaveLength(3);
    expect(errors[2]).toMatchObject({
      controller: 'retry',
      key: 'ns/x',
      err: 'apiserver said no',
      failures: 3,
    });
    const text = await metrics.registry.metrics();
    expect(text).toMatch(
      /lockstep_operator_reconcile_total\{controller="retry",result="error"\} 3/,
    );
    expect(text).toMatch(
      /lockstep_operator_reconcile_total\{controller="retry",result="success"\} 1/,
    );
  });

  it('looks again after requeueAfterMs', async () => {
    const q = new WorkQueue();
    const times: number[] = [];
    const loop = runControllerLoop(
      q,
      () => {
        times.push(Date.now());
        return Promise.resolve(times.length < 3 ? { requeueAfterMs: 40 } : undefined);
      },
      { name: 'later', workers: 1, log },
    );
    q.add('k');
    await sleep(250);
    q.shutDown();
    await loop;
    expect(times).toHaveLength(3);
    for (let i = 1; i < times.length; i++)
      expect(times[i] - times[i - 1]).toBeGreaterThanOrEqual(35);
  });

  it('resolves after shutDown only once in-flight reconciles finish', async () => {
    const q = new WorkQueue();
    let finished = false;
    const loop = runControllerLoop(
      q,
      async () => {
        await sleep(50);
        finished = true;
      },
      { name: 'slow', workers: 1, log },
    );
    q.add('k');
    await sleep(5);
    q.shutDown();
    await loop;
    expect(finished).toBe(true);
  });

  it('serves the queue depth and reconcile counts on /metrics', async () => {
    const q = new WorkQueue();
    const metrics = new ControllerMetrics();
    let release!: () => void;
    const blocked = new Promise<void>((r) => (release = r));
    const loop = runControllerLoop(q, () => blocked, { name: 'depth', workers: 1, log, metrics });
    q.add('a');
    q.add('b');
    q.add('c');
    await sleep(5);
    const server = await metrics.serve('127.0.0.1', 0, () => true);
    try {
      const text = await (await fetch(`http://${server.address}/metrics`)).text();
      expect(text).toMatch(/lockstep_operator_workqueue_depth\{controller="depth"\} 2/);
    } finally {
      await server.close();
    }
    release();
    q.shutDown();
    await loop;
  });
});
