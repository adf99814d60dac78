// Moving a two-volume group's primary to a third agent while clients write (the steps of
// `lockstep ctl move`, driven in-process): the bytes the existing replica receives per byte
// written meanwhile (target ≤ 1.1 — it is resynced from the switchover's snapshot, never
// baselined again), how long the move took and how long writes were held at the switchover.
// The clients are the tests' libnbd writers that follow the primary (a write in flight at the
// switchover is sent again to the new primary), as fast as they go at queue depth 8.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { AgentClient } from '../lib/agent-client';
import { stepMove, type MoveSpec } from '../lib/group-move';
import { AgentProcess } from '../test/harness/agent-process';
import {
  ackedCount,
  followWriterSummary,
  receivedBytes,
  startFollowWriter,
} from '../test/harness/follow-writer';
import { waitFor, type ManagedProcess } from '../test/harness/processes';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;
const VOLUMES = ['m1', 'm2'];

export interface MoveResult {
  regionSize: number;
  writtenBytes: number;
  receivedBytes: number;
  seconds: number;
  holdMs: number;
}

export async function moveRun(regionSize = 64 * 1024): Promise<MoveResult> {
  const agents = ['bench-a', 'bench-b', 'bench-c'].map((node) => new AgentProcess({ node }));
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-move-'));
  const writers: ManagedProcess[] = [];
  const clients: AgentClient[] = [];
  try {
    const [a, b, c] = await Promise.all(agents.map((x) => x.start()));
    const [ca, cc] = [a, c].map((x) => x.client(30_000));
    clients.push(ca, cc);
    for (const v of VOLUMES) {
      const uri = await a.createVolume(v, '1GiB');
      await execFileAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 512m', uri]);
      await ca.replicate({
        name: v,
        targets: [b.grpcAddress],
        mode: 'sync',
        regionSize,
        maxResyncBytesPerSecond: 0,
      });
    }
    await ca.createGroup('g', VOLUMES);
    await waitFor(
      'the replica in sync',
      async () => {
        const vols = await Promise.all(VOLUMES.map((v) => ca.getVolume(v)));
        return vols.every((v) => v.replication?.peers[0]?.state === 'InSync') || undefined;
      },
      600_000,
      250,
    );

    const stop = path.join(dir, 'stop');
    const logs = VOLUMES.map((v) => path.join(dir, `${v}.acked`));
    for (const [i, v] of VOLUMES.entries()) {
      writers.push(startFollowWriter(`writer-${v}`, [a.uri(v), c.uri(v)], logs[i], stop));
    }
    await new Promise((r) => setTimeout(r, 3_000));

    const spec: MoveSpec = {
      volumes: VOLUMES,
      group: 'g',
      from: ca,
      fromAddress: a.grpcAddress,
      to: cc,
      toAddress: c.grpcAddress,
      keepSource: false,
    };
    const received0 = await receivedBytes(b.grpcAddress, VOLUMES);
    const acked0 = logs.map(ackedCount);
    const started = performance.now();
    let holdMs = 0;
    for (;;) {
      const p = await stepMove(spec);
      if (p.switchedOver) holdMs = p.switchedOver.holdMs;
      if (p.phase === 'Done') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const seconds = (performance.now() - started) / 1000;
    writeFileSync(stop, '');
    for (const w of writers) await followWriterSummary(w);
    return {
      regionSize,
      writtenBytes: logs.reduce((n, l, i) => n + (ackedCount(l) - acked0[i]) * 4096, 0),
      receivedBytes: (await receivedBytes(b.grpcAddress, VOLUMES)) - received0,
      seconds,
      holdMs,
    };
  } finally {
    for (const w of writers) await w.kill('SIGKILL');
    for (const cl of clients) cl.close();
    for (const x of agents) await x.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
}

export function moveReport(r: MoveResult): string {
  return (
    `move region_kib=${r.regionSize / 1024} written_mib=${(r.writtenBytes / MiB).toFixed(1)} ` +
    `replica_received_mib=${(r.receivedBytes / MiB).toFixed(1)} ` +
    `received_ratio=${(r.receivedBytes / r.writtenBytes).toFixed(3)} ` +
    `seconds=${r.seconds.toFixed(2)} hold_ms=${r.holdMs.toFixed(1)}`
  );
}
