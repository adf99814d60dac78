// Establishing a replica by snapshots while the workload writes: a half-full 1 GiB volume,
// fio's rand4k qd16 job running at a fixed rate (so the bytes written meanwhile are known),
// and the replica added 4 s in. Reported against the targets, from one run:
//   - bytes sent per byte of (data allocated at the start + data written until InSync) ≤ 1.1;
//   - the writes' p99 from the start until InSync against the p99 before it ≤ 2×;
// and the rounds it took. The idle baseline's speed against nbdcopy is run.ts's baselineRun.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { AgentProcess } from '../test/harness/agent-process';
import { latencyAround } from './latency-window';
import { replicateToInSync } from './replicate';
import { rand4kArgs } from './snapshots';

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
  const client = a.client();
  try {
    const uri = await a.createVolume('bench', '1GiB');
    await execFileAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 512m', uri]);
    let allocatedBytes = 0;
    const r = await latencyAround(
      [...rand4kArgs(uri, 300), `--rate_iops=${RATE_IOPS}`],
      4_000,
      async () => {
        allocatedBytes = Number((await client.getVolume('bench')).allocatedBytes);
        const r = await replicateToInSync(client, 'bench', b.grpcAddress, 100);
        return { endedEpoch: r.inSyncAt, sentBytes: r.sentBytes, seconds: r.seconds };
      },
    );
    return {
      allocatedBytes,
      writtenBytes: r.writesDuring * 4096,
      sentBytes: r.sentBytes,
      seconds: r.seconds,
      rounds: (a.logs().match(/establishment: (baseline|diff) committed/g) ?? []).length,
      p99BeforeUs: r.p99BeforeUs,
      p99DuringUs: r.p99DuringUs,
      writesBefore: r.writesBefore,
      writesDuring: r.writesDuring,
    };
  } finally {
    client.close();
    await a.dispose();
    await b.dispose();
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
