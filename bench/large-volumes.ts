// Replicating large volumes: the cost must follow the data, never the volume size, and the
// agent must keep serving everything else meanwhile. Two runs:
//   - a fresh 8 TiB volume: Replicate → InSync, in seconds (target ≤ 2 s);
//   - a 1 TiB volume holding 4 GiB: bytes the baseline sends per byte written (target ≤ 1.1),
//     the agent's event-loop delay p99 over the baseline (target ≤ 20 ms), and the p99 of a
//     qd1 4 KiB writer on another, unreplicated volume of the same agent, during the baseline
//     against at rest (target ≤ 2×).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { AgentClient } from '../lib/agent-client';
import { replicateToInSync } from './replicate';
import { eventLoopDelayMs } from './event-loop-delay';
import { AgentProcess } from '../test/harness/agent-process';
import { percentile, Qd1Writer } from '../test/harness/qd1-writer';

const execFileAsync = promisify(execFile);

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const AT_REST_MS = 3_000;

export interface LargeVolumes {
  freshInSyncSeconds: number;
  writtenBytes: number;
  baselineSentBytes: number;
  baselineSeconds: number;
  eventLoopP99Ms: number;
  /** The same, over the at-rest writer's run: what the machine's load alone gives. */
  eventLoopAtRestP99Ms: number;
  qd1AtRestP99Us: number;
  qd1DuringP99Us: number;
}

/** Replicates `name` to `peer` and waits for InSync; seconds by the agent's own clock. */
async function resyncBytesSent(client: AgentClient, name: string): Promise<number> {
  return Number((await client.getVolume(name)).replication?.peers[0]?.resyncBytesSent ?? NaN);
}

async function freshRun(): Promise<number> {
  const a = await new AgentProcess({ node: 'bench-a' }).start();
  const b = await new AgentProcess({ node: 'bench-b' }).start();
  const client = a.client();
  try {
    await client.createVolume('fresh', 8 * 1024 * GiB);
    return (await replicateToInSync(client, 'fresh', b.grpcAddress, 50)).seconds;
  } finally {
    client.close();
    await a.dispose();
    await b.dispose();
  }
}

async function busyRun(): Promise<Omit<LargeVolumes, 'freshInSyncSeconds'>> {
  const a = await new AgentProcess({ node: 'bench-a', metrics: true }).start();
  const b = await new AgentProcess({ node: 'bench-b' }).start();
  const client = a.client();
  try {
    await client.createVolume('big', 1024 * GiB);
    await client.createVolume('other', 1 * GiB);
    // 4 GiB in 64 MiB pieces, one every 16 GiB, written through the agent by qemu-io.
    const pieces = 64;
    const cmds = Array.from({ length: pieces }, (_, i) => [
      '-c',
      `write -P ${i + 1} ${i * 16 * GiB} 64m`,
    ]);
    const t0 = performance.now();
    await execFileAsync('qemu-io', ['-f', 'raw', ...cmds.flat(), a.uri('big')]);
    const writtenBytes = pieces * 64 * MiB;
    process.stderr.write(`  4 GiB written in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);

    const rest = await Qd1Writer.start(a.nbdSocket, 'other', 1 * GiB);
    await eventLoopDelayMs(a); // starts the agent's delay histogram over
    await new Promise((r) => setTimeout(r, AT_REST_MS));
    const eventLoopAtRest = (await eventLoopDelayMs(a)).p99Ms;
    const atRest = await rest.stop();

    const during = await Qd1Writer.start(a.nbdSocket, 'other', 1 * GiB);
    await eventLoopDelayMs(a); // starts the agent's delay histogram over
    let baselineSeconds: number;
    let eventLoop: number;
    let duringMs: number[];
    try {
      baselineSeconds = (await replicateToInSync(client, 'big', b.grpcAddress, 50)).seconds;
      eventLoop = (await eventLoopDelayMs(a)).p99Ms;
    } finally {
      duringMs = await during.stop();
    }
    return {
      writtenBytes,
      baselineSentBytes: await resyncBytesSent(client, 'big'),
      baselineSeconds,
      eventLoopP99Ms: eventLoop,
      eventLoopAtRestP99Ms: eventLoopAtRest,
      qd1AtRestP99Us: percentile(atRest, 99) * 1000,
      qd1DuringP99Us: percentile(duringMs, 99) * 1000,
    };
  } finally {
    client.close();
    await a.dispose();
    await b.dispose();
  }
}

export async function largeVolumesRun(): Promise<LargeVolumes> {
  return { freshInSyncSeconds: await freshRun(), ...(await busyRun()) };
}

/** The markdown paragraph for the report. */
export function largeVolumesReport(r: LargeVolumes): string {
  const ratio = r.qd1DuringP99Us / r.qd1AtRestP99Us;
  return [
    `Large volumes: a fresh 8 TiB volume is InSync **${r.freshInSyncSeconds.toFixed(2)} s** after Replicate (target ≤ 2 s). ` +
      `A 1 TiB volume holding ${r.writtenBytes / GiB} GiB baselines in ${r.baselineSeconds.toFixed(2)} s, sending ` +
      `${r.baselineSentBytes} bytes → **${(r.baselineSentBytes / r.writtenBytes).toFixed(3)}×** the data (target ≤ 1.1); ` +
      `meanwhile the agent's event-loop delay p99 is **${r.eventLoopP99Ms.toFixed(1)} ms** (target ≤ 20 ms; ` +
      `${r.eventLoopAtRestP99Ms.toFixed(1)} ms at rest, with the same writer) and a qd1 4 KiB ` +
      `writer on another volume of the agent has p99 ${r.qd1DuringP99Us.toFixed(0)} µs against ${r.qd1AtRestP99Us.toFixed(0)} µs ` +
      `at rest → **${ratio.toFixed(2)}×** (target ≤ 2×).`,
    `large-volumes fresh8t_insync_s=${r.freshInSyncSeconds.toFixed(3)} baseline1t_s=${r.baselineSeconds.toFixed(3)} ` +
      `sent_ratio=${(r.baselineSentBytes / r.writtenBytes).toFixed(4)} eventloop_p99_ms=${r.eventLoopP99Ms.toFixed(2)} eventloop_rest_p99_ms=${r.eventLoopAtRestP99Ms.toFixed(2)} ` +
      `qd1_p99_us=${r.qd1DuringP99Us.toFixed(0)} qd1_rest_p99_us=${r.qd1AtRestP99Us.toFixed(0)}`,
  ].join('\n\n');
}
