// The reference fio jobs (../shared/bench/fio-nbd.sh) as this package runs them: their result
// lines parsed, a replicated pair of agents to run them against, and the table of ratios to an
// anchor measured in the same round.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { AgentProcess } from '../test/harness/agent-process';
import { inSync, waitPeer } from '../test/harness/replication';

const execFileAsync = promisify(execFile);

export interface JobResult {
  label: string;
  job: string;
  iops: number;
  MBps: number;
  p50_us: number;
  p99_us: number;
}

export const JOBS = ['rand4k-qd16', 'rand4k-qd1', 'seq1m-qd4', 'rand4k-fsync-qd1'] as const;

export function parseFioLines(text: string): JobResult[] {
  const out: JobResult[] = [];
  for (const line of text.split('\n')) {
    const m =
      /^(\S+)-(rand4k-qd16|rand4k-qd1|seq1m-qd4|rand4k-fsync-qd1) iops=(\d+) MBps=([\d.]+) p50_us=(\d+) p99_us=(\d+)$/.exec(
        line.trim(),
      );
    if (m)
      out.push({
        label: m[1],
        job: m[2],
        iops: +m[3],
        MBps: +m[4],
        p50_us: +m[5],
        p99_us: +m[6],
      });
  }
  return out;
}

/** Runs a shared bench script; its output goes to stderr as it is, and is returned. */
export async function sh(
  script: string,
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<string> {
  const { stdout } = await execFileAsync('bash', [script, ...args], { env, maxBuffer: 16 << 20 });
  process.stderr.write(stdout);
  return stdout;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** Two agents (mutual TLS unless `insecure`) and a volume on the first, not yet replicated. */
export async function replicatedPair(
  size: string,
  insecure = false,
): Promise<[AgentProcess, AgentProcess, string]> {
  const a = await new AgentProcess({ node: 'bench-a', insecure }).start();
  const b = await new AgentProcess({ node: 'bench-b', insecure }).start();
  const uri = await a.createVolume('bench', size.replace(/G$/, 'GiB').replace(/M$/, 'MiB'));
  return [a, b, uri];
}

/** The fio jobs against a volume replicated synchronously to a second agent, as `label`. */
export async function replicatedRun(
  fio: string,
  size: string,
  runtime: string,
  label = 'lockstep-sync',
  insecure = false,
): Promise<JobResult[]> {
  const [a, b, uri] = await replicatedPair(size, insecure);
  try {
    await a.ctl('replicate', 'bench', '--to', b.grpcAddress);
    await waitPeer(a, 'bench', b, inSync, 'in sync', 300_000);
    return parseFioLines(await sh(fio, [label, uri, size, runtime]));
  } finally {
    await a.dispose();
    await b.dispose();
  }
}

/**
 * Table rows `| ours / anchor | job | IOPS | MB/s | p50 | p99 |`: medians over rounds, and the
 * median of the per-round ratios (the machine's speed drifts between rounds).
 */
export function ratioRows(
  perRound: JobResult[][],
  pairs: ReadonlyArray<readonly [string, string]>,
  jobs: readonly string[] = JOBS,
): string[] {
  const fields = ['iops', 'MBps', 'p50_us', 'p99_us'] as const;
  const rows: string[] = [];
  for (const [ours, anchor] of pairs) {
    for (const job of jobs) {
      const cells = fields.map((f) => {
        const pick = (label: string) =>
          perRound.map((rs) => rs.find((r) => r.label === label && r.job === job)?.[f] ?? NaN);
        const o = pick(ours);
        const a = pick(anchor);
        const ratios = o.map((v, i) => v / a[i]).filter(Number.isFinite);
        if (ratios.length === 0) return 'n/a';
        return `${+median(o).toFixed(1)} / ${+median(a).toFixed(1)} → **${median(ratios).toFixed(2)}**`;
      });
      rows.push(`| ${ours} / ${anchor} | ${job} | ${cells.join(' | ')} |`);
    }
  }
  return rows;
}

/** One line per job and round, as the raw record under a report. */
export function rawLines(perRound: JobResult[][]): string[] {
  return perRound.flatMap((rs, i) =>
    rs.map(
      (r) =>
        `round${i + 1} ${r.label}-${r.job} iops=${r.iops} MBps=${r.MBps} p50_us=${r.p50_us} p99_us=${r.p99_us}`,
    ),
  );
}
