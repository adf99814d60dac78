// `npm run bench`: the reference fio jobs against a Lockstep export and, in the same run,
// against qemu-storage-daemon (../shared/bench/anchor-qemu.sh). Figures drift on shared
// machines, so what counts is each Lockstep figure as a ratio to its anchor from this run.
//
// usage: node dist/bench/run.js [--size 1G] [--runtime 10] [--shared-bench DIR]
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { AgentProcess } from '../test/harness/agent-process';

const execFileAsync = promisify(execFile);

interface JobResult {
  label: string;
  job: string;
  iops: number;
  MBps: number;
  p50_us: number;
  p99_us: number;
}

export function parseFioLines(text: string): JobResult[] {
  const out: JobResult[] = [];
  for (const line of text.split('\n')) {
    const m =
      /^(\S+)-(rand4k-qd16|rand4k-qd1|seq1m-qd4) iops=(\d+) MBps=([\d.]+) p50_us=(\d+) p99_us=(\d+)$/.exec(
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

async function sh(
  script: string,
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<string> {
  const { stdout } = await execFileAsync('bash', [script, ...args], { env, maxBuffer: 16 << 20 });
  process.stderr.write(stdout);
  return stdout;
}

const JOBS = ['rand4k-qd16', 'rand4k-qd1', 'seq1m-qd4'] as const;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      runtime: { type: 'string', default: '10' },
      rounds: { type: 'string', default: '1' },
      'shared-bench': {
        type: 'string',
        default: path.resolve(__dirname, '..', '..', '..', 'shared', 'bench'),
      },
    },
  });
  const bench = values['shared-bench'];
  const { size, runtime } = values;
  const rounds = Number(values.rounds);
  const fio = path.join(bench, 'fio-nbd.sh');

  // Each round measures the anchor and Lockstep back to back; ratios are taken within a round
  // and the median across rounds is reported, since the machine's speed drifts between rounds.
  const perRound: JobResult[][] = [];
  const work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-'));
  try {
    for (let round = 1; round <= rounds; round++) {
      const results: JobResult[] = [];
      process.stderr.write(
        `round ${round}/${rounds}: qemu-storage-daemon (${size}, ${runtime}s per job)\n`,
      );
      const qemuDir = path.join(work, `qemu-${round}`);
      results.push(
        ...parseFioLines(
          await sh(path.join(bench, 'anchor-qemu.sh'), [size, runtime], {
            ...process.env,
            D: qemuDir,
          }),
        ),
      );
      rmSync(qemuDir, { recursive: true, force: true });

      const agent = await new AgentProcess({ node: 'bench' }).start();
      try {
        const uri = await agent.createVolume(
          'bench',
          size.replace(/G$/, 'GiB').replace(/M$/, 'MiB'),
        );
        process.stderr.write(`round ${round}/${rounds}: lockstep, local export\n`);
        results.push(...parseFioLines(await sh(fio, ['lockstep-local', uri, size, runtime])));
      } finally {
        await agent.dispose();
      }
      perRound.push(results);
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }

  const pairs = [['lockstep-local', 'qemu-local']] as const;
  const fields = ['iops', 'MBps', 'p50_us', 'p99_us'] as const;
  const rows: string[] = [];
  for (const [ours, anchor] of pairs) {
    for (const job of JOBS) {
      const cells = fields.map((f) => {
        const pick = (label: string) =>
          perRound.map((rs) => rs.find((r) => r.label === label && r.job === job)?.[f] ?? NaN);
        const o = pick(ours);
        const a = pick(anchor);
        const ratios = o.map((v, i) => v / a[i]).filter(Number.isFinite);
        if (ratios.length === 0) return 'n/a';
        return `${median(o)} / ${median(a)} → **${median(ratios).toFixed(2)}**`;
      });
      rows.push(`| ${ours} / ${anchor} | ${job} | ${cells.join(' | ')} |`);
    }
  }
  const when = new Date().toISOString().slice(0, 16).replace('T', ' ');
  process.stdout.write(
    [
      `### ${when} UTC — ${size}, ${runtime} s per job, ${rounds} round(s), ${os.cpus().length} cores`,
      '',
      'Medians over rounds: ours / anchor → median of the per-round ratios.',
      '',
      '| pair | job | IOPS | MB/s | p50 µs | p99 µs |',
      '|---|---|---|---|---|---|',
      ...rows,
      '',
      'Raw lines:',
      '```',
      ...perRound.flatMap((rs, i) =>
        rs.map(
          (r) =>
            `round${i + 1} ${r.label}-${r.job} iops=${r.iops} MBps=${r.MBps} p50_us=${r.p50_us} p99_us=${r.p99_us}`,
        ),
      ),
      '```',
      '',
    ].join('\n'),
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
