// promtool, from Debian's prometheus package (scripts/promtool.sh extracts it once), and a
// parser for the Prometheus text format the tests read metrics with.
import { execFile, execFileSync } from 'node:child_process';
import path from 'node:path';
import { packageRoot } from '../../lib/package-root';

let cached: string | undefined;

function promtoolBin(): string {
  cached ??= execFileSync('bash', [path.join(packageRoot, 'scripts', 'promtool.sh')], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  }).trim();
  return cached;
}

/** Runs promtool with `args` (and `input` on stdin); never rejects: the exit code says. */
export function promtool(
  args: string[],
  input = '',
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(promtoolBin(), args, { maxBuffer: 16 << 20 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
    child.stdin?.end(input);
  });
}

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The samples of a scrape (comments skipped). */
export function parseSamples(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g))
      labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

/** The samples of one metric whose labels include `match`. */
export function samplesOf(
  samples: Sample[],
  name: string,
  match: Record<string, string> = {},
): Sample[] {
  return samples.filter(
    (s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v),
  );
}
