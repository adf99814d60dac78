// Replication over mutual TLS, against replication in plaintext (--insecure) and against
// qemu's synchronous mirror over x509 TLS (../shared/bench/anchor-qemu-tls.sh), round by round.
import { rmSync } from 'node:fs';
import path from 'node:path';
import {
  JOBS,
  parseFioLines,
  ratioRows,
  rawLines,
  replicatedRun,
  sh,
  type JobResult,
} from './fio-jobs';

export async function tlsRun(
  bench: string,
  work: string,
  size: string,
  runtime: string,
  rounds: number,
): Promise<JobResult[][]> {
  const fio = path.join(bench, 'fio-nbd.sh');
  const perRound: JobResult[][] = [];
  for (let round = 1; round <= rounds; round++) {
    process.stderr.write(
      `tls round ${round}/${rounds}: qemu mirror over TLS, ours over mTLS and plaintext\n`,
    );
    const dir = path.join(work, `qemu-tls-${round}`);
    const results = parseFioLines(
      await sh(path.join(bench, 'anchor-qemu-tls.sh'), [size, runtime], { ...process.env, D: dir }),
    );
    rmSync(dir, { recursive: true, force: true });
    results.push(...(await replicatedRun(fio, size, runtime, 'lockstep-sync-mtls')));
    results.push(...(await replicatedRun(fio, size, runtime, 'lockstep-sync-plain', true)));
    perRound.push(results);
  }
  return perRound;
}

export function tlsReport(perRound: JobResult[][]): string {
  return [
    `Replication over mutual TLS (${perRound.length} round(s)): against plaintext (--insecure), and against`,
    'qemu’s write-blocking mirror over x509 TLS (qemu-sync-tls). Targets: mTLS/plaintext ≥ 0.8× 4k qd16',
    'IOPS and ≥ 0.7× 1M MB/s; mTLS/qemu-sync-tls ≥ 1.5× 4k qd16 IOPS and ≥ 1.2× 1M MB/s.',
    '',
    '| pair | job | IOPS | MB/s | p50 µs | p99 µs |',
    '|---|---|---|---|---|---|',
    ...ratioRows(
      perRound,
      [
        ['lockstep-sync-mtls', 'lockstep-sync-plain'],
        ['lockstep-sync-mtls', 'qemu-sync-tls'],
      ],
      JOBS,
    ),
    '',
    '```',
    ...rawLines(perRound),
    '```',
  ].join('\n');
}
