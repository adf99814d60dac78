// A 4 KiB random writer at queue depth 1 over NBD that records each write's latency: the probe
// for "does this agent keep serving other volumes while it does something heavy".
import { randomBytes } from 'node:crypto';
import { NbdClient } from '../../lib/nbd-client';

const BLOCK = 4096;

export class Qd1Writer {
  private readonly latenciesMs: number[] = [];
  private stopping = false;
  private readonly loop: Promise<void>;

  private constructor(
    private readonly client: NbdClient,
    spanBytes: number,
  ) {
    const blocks = Math.floor(spanBytes / BLOCK);
    const data = randomBytes(BLOCK);
    this.loop = (async () => {
      while (!this.stopping) {
        const offset = Math.floor(Math.random() * blocks) * BLOCK;
        const t0 = performance.now();
        await this.client.write(offset, data);
        this.latenciesMs.push(performance.now() - t0);
      }
    })();
    // A server killed under it ends the loop with an error: `stop` reports it, not the process.
    this.loop.catch(() => undefined);
  }

  /** Starts writing within the first `spanBytes` of the export. */
  static async start(
    socketPath: string,
    exportName: string,
    spanBytes: number,
  ): Promise<Qd1Writer> {
    const client = await NbdClient.connect({ socketPath }, exportName, { timeoutMs: 60_000 });
    return new Qd1Writer(client, spanBytes);
  }

  /** Writes completed so far. */
  get count(): number {
    return this.latenciesMs.length;
  }

  /** Stops after the write in flight; returns every write's latency in ms, in order. */
  async stop(): Promise<number[]> {
    this.stopping = true;
    try {
      await this.loop;
    } finally {
      await this.client.close();
    }
    return this.latenciesMs;
  }
}

/** The p-th percentile (0..100) of `xs`, nearest rank. */
export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}
