// Establishing a replica by snapshots while the workload writes: a half-full 1 GiB volume,
// fio's rand4k qd16 job running at a fixed rate (so the bytes written meanwhile are known),
// and the replica added 4 s in. Reported against the targets, from one run:
//   - bytes sent per byte of (data allocated at the start + data written until InSync) ≤ 1.1;
//   - the writes' p99 from the start until InSync against the p99 before it ≤ 2×;
// and the rounds it took. The idle baseline's speed against nbdcopy is run.ts's baselineRun.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentClient } from '../lib/agent-client';
import { AgentProcess } from '../test/harness/agent-process';
import { waitFor } from '../test/harness/processes';
import { percentile } from '../test/harness/qd1-writer';
import { readLatLog } from './snapshots';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;
/** fio's rate: 16 MiB/s of 4 KiB writes, a busy database's worth, well below the disk's. */
const RATE_IOPS = 4096;

export interface EstablishmentResult {
  allocatedBytes: number;
  writtenBytes: number;
  sentBytes: number;
  seconds: number;
  rounds: number;
  p99BeforeUs: number;
  p99DuringUs: number;
  writesBefore: number;
  writesDuring: number;
}

export async function establishmentRun(): Promise<EstablishmentResult> {
  const a = await new AgentProcess({ node: 'bench-a' }).start();
  const b = await new AgentProcess({ node: 'bench-b' }).start();
  const client = new AgentClient(a.grpcAddress);
  const logDir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-establish-'));
  try {
    const uri = await a.createVolume('bench', '1GiB');
    await execFileAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 512m', uri]);
    const latLog = path.join(logDir, 'w');
    const fio = execFileAsync('fio', [
      '--name=rand4k-qd16',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=1G',
      `--rate_iops=${RATE_IOPS}`,
      '--time_based',
      '--runtime=300',
      `--write_lat_log=${latLog}`,
      '--log_unix_epoch=1',
      '--output=/dev/null',
    ]);
    // Stopped by SIGINT, fio exits non-zero; its latency log is what is read.
    const ended = fio.then(
      () => undefined,
      () => undefined,
    );
    await new Promise((r) => setTimeout(r, 4_000));
    const allocatedBytes = Number((await client.getVolume('bench')).allocatedBytes);
    const startedEpoch = Date.now();
    await client.replicate({
      name: 'bench',
      targets: [b.grpcAddress],
      mode: 'sync',
      regionSize: 64 * 1024,
      maxResyncBytesPerSecond: 0,
    });
    const { endedEpoch, sentBytes } = await waitFor(
      'the replica in sync',
      async () => {
        const peer = (await client.getVolume('bench')).replication?.peers[0];
        return peer?.state === 'InSync' && Number(peer.dirtyBytes) === 0
          ? { endedEpoch: Number(peer.lastInSyncMs), sentBytes: Number(peer.resyncBytesSent) }
          : undefined;
      },
      300_000,
      100,
    );
    await new Promise((r) => setTimeout(r, 1_000));
    fio.child.kill('SIGINT');
    await ended;
    const log = readLatLog(`${latLog}_clat.1.log`);
    const firstEpoch = log[0]?.[0] ?? startedEpoch;
    // The first half second is fio connecting and ramping up.
    const before = log.filter(([t]) => t >= firstEpoch + 500 && t < startedEpoch).map(([, l]) => l);
    const during = log.filter(([t]) => t >= startedEpoch && t <= endedEpoch).map(([, l]) => l);
    const agentLog = readdirSync(a.dataDir)
      .filter((f) => f.startsWith('agent.') && f.endsWith('.log'))
      .map((f) => readFileSync(path.join(a.dataDir, f), 'utf8'))
      .join('');
    return {
      allocatedBytes,
      writtenBytes: during.length * 4096,
      sentBytes,
      seconds: (endedEpoch - startedEpoch) / 1000,
      rounds: (agentLog.match(/establishment: (baseline|diff) committed/g) ?? []).length,
      p99BeforeUs: percentile(before, 99),
      p99DuringUs: percentile(during, 99),
      writesBefore: before.length,
      writesDuring: during.length,
    };
  } finally {
    client.close();
    await a.dispose();
    await b.dispose();
    rmSync(logDir, { recursive: true, force: true });
  }
}

export function establishmentReport(r: EstablishmentResult): string {
  const base = r.allocatedBytes + r.writtenBytes;
  return (
    `establishment allocated_mib=${(r.allocatedBytes / MiB).toFixed(1)} ` +
    `written_mib=${(r.writtenBytes / MiB).toFixed(1)} sent_mib=${(r.sentBytes / MiB).toFixed(1)} ` +
    `sent_ratio=${(r.sentBytes / base).toFixed(3)} seconds=${r.seconds.toFixed(2)} rounds=${r.rounds} ` +
    `p99_before_us=${r.p99BeforeUs.toFixed(0)} p99_during_us=${r.p99DuringUs.toFixed(0)} ` +
    `p99_ratio=${(r.p99DuringUs / r.p99BeforeUs).toFixed(2)} writes_before=${r.writesBefore} ` +
    `writes_during=${r.writesDuring}`
  );
}
