// The mediator's compare-and-swap under load: a mediator holding 10,000 groups, and N clients
// (8: agents failing over at once; 64: far more than the mediator serves on two shared cores)
// each moving random groups to their next epoch as fast as answers come back (every answer is
// durable first: an fdatasync per batch). Reported: swaps per second and the latency p50/p99
// of one swap as a client sees it (target: p99 < 50 ms with 10,000 groups).
import { percentile } from '../test/harness/qd1-writer';
import { MediatorProcess } from '../test/harness/mediator-process';
import type { MediatorClient } from '../lib/mediator-client';

const GROUPS = 10_000;
const SECONDS = 10;

export interface MediatorResult {
  groups: number;
  clients: number;
  swaps: number;
  seconds: number;
  p50Ms: number;
  p99Ms: number;
}

export async function mediatorRun(concurrency: number): Promise<MediatorResult> {
  const m = await new MediatorProcess().start();
  const clients: MediatorClient[] = [];
  try {
    const setup = m.client();
    clients.push(setup);
    const names = Array.from({ length: GROUPS }, (_, i) => `bench.group-${i}`);
    // The groups exist first, in batches of 1,000 (one sync each).
    for (let i = 0; i < GROUPS; i += 1_000)
      await Promise.all(
        names.slice(i, i + 1_000).map((g) => setup.compareAndSwap(g, 0, 'a:1', ['b:1'])),
      );
    const epochs = new Map(names.map((g) => [g, 1]));
    const latencies: number[] = [];
    const deadline = performance.now() + SECONDS * 1000;
    const started = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async (_, i) => {
        const c = m.client();
        clients.push(c);
        const me = `10.0.${i >> 8}.${i & 255}:7400`;
        while (performance.now() < deadline) {
          const g = names[Math.floor(Math.random() * GROUPS)];
          const t = performance.now();
          const a = await c.compareAndSwap(g, epochs.get(g) ?? 0, me, [me]);
          latencies.push(performance.now() - t);
          epochs.set(g, a.record.epoch);
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    return {
      groups: GROUPS,
      clients: concurrency,
      swaps: latencies.length,
      seconds,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
    };
  } finally {
    for (const c of clients) c.close();
    await m.dispose();
  }
}

export function mediatorReport(r: MediatorResult): string {
  return (
    `mediator groups=${r.groups} clients=${r.clients} swaps=${r.swaps} ` +
    `swaps_per_s=${(r.swaps / r.seconds).toFixed(0)} cas_p50_ms=${r.p50Ms.toFixed(2)} ` +
    `cas_p99_ms=${r.p99Ms.toFixed(2)}`
  );
}
