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

function ratio(ours: number, theirs: number): string {
  return theirs > 0 ? (ours / theirs).toFixed(2) : 'n/a';
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      runtime: { type: 'string', default: '10' },
      'shared-bench': {
        type: 'string',
        default: path.resolve(__dirname, '..', '..', '..', 'shared', 'bench'),
      },
    },
  });
  const bench = values['shared-bench'];
  const size = values.size;
  const runtime = values.runtime;
  const fio = path.join(bench, 'fio-nbd.sh');

  const results: JobResult[] = [];
  const work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-'));
  try {
    process.stderr.write(`anchor: qemu-storage-daemon (${size}, ${runtime}s per job)\n`);
    results.push(
      ...parseFioLines(
        await sh(path.join(bench, 'anchor-qemu.sh'), [size, runtime], {
          ...process.env,
          D: path.join(work, 'qemu'),
        }),
      ),
    );

    const agent = await new AgentProcess({ node: 'bench' }).start();
    try {
      const uri = await agent.createVolume('bench', size.replace(/G$/, 'GiB').replace(/M$/, 'MiB'));
      process.stderr.write('lockstep: local export, no replication\n');
      results.push(...parseFioLines(await sh(fio, ['lockstep-local', uri, size, runtime])));
    } finally {
      await agent.dispose();
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }

  const get = (label: string, job: string) =>
    results.find((r) => r.label === label && r.job === job);
  const rows: string[] = [];
  for (const [ours, anchor] of [['lockstep-local', 'qemu-local']] as const) {
    for (const job of ['rand4k-qd16', 'rand4k-qd1', 'seq1m-qd4']) {
      const a = get(anchor, job);
      const o = get(ours, job);
      if (!a || !o) continue;
      rows.push(
        `| ${ours} vs ${anchor} | ${job} | ${o.iops} / ${a.iops} = **${ratio(o.iops, a.iops)}** | ` +
          `${o.MBps} / ${a.MBps} = **${ratio(o.MBps, a.MBps)}** | ${o.p50_us} / ${a.p50_us} = ${ratio(o.p50_us, a.p50_us)} | ` +
          `${o.p99_us} / ${a.p99_us} = ${ratio(o.p99_us, a.p99_us)} |`,
      );
    }
  }
  const when = new Date().toISOString().slice(0, 16).replace('T', ' ');
  process.stdout.write(
    [
      `### ${when} UTC — ${size}, ${runtime} s per job, ${os.cpus().length} cores`,
      '',
      '| pair | job | IOPS (ours / anchor = ratio) | MB/s | p50 µs | p99 µs |',
      '|---|---|---|---|---|---|',
      ...rows,
      '',
      'Raw lines:',
      '```',
      ...results.map(
        (r) =>
          `${r.label}-${r.job} iops=${r.iops} MBps=${r.MBps} p50_us=${r.p50_us} p99_us=${r.p99_us}`,
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
