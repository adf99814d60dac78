// fio writing with every write's completion latency logged against its Unix time, while
// something happens (a snapshot reclaimed, a replica established): the p99 of the writes
// before it began and of those until it ended, from one run.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { percentile } from '../test/harness/qd1-writer';

const execFileAsync = promisify(execFile);

export interface LatencyWindow {
  p99BeforeUs: number;
  p99DuringUs: number;
  writesBefore: number;
  writesDuring: number;
}

/** [Unix ms, latency µs] of each write in a fio completion-latency log. */
function readLatLog(file: string): [number, number][] {
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => {
      const [t, ns] = l.split(',');
      return [Number(t), Number(ns) / 1000] as [number, number];
    });
}

/**
 * Runs fio with `fioArgs` (a time-based write job that outlasts the event), waits `leadMs`,
 * runs `event` (which resolves with the Unix ms it ended), lets fio write a second more and
 * stops it. Resolves with the event's result and the two windows' latencies.
 */
export async function latencyAround<T extends { endedEpoch: number }>(
  fioArgs: string[],
  leadMs: number,
  event: () => Promise<T>,
): Promise<T & LatencyWindow> {
  const logDir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-latlog-'));
  try {
    const latLog = path.join(logDir, 'w');
    const fio = execFileAsync('fio', [
      ...fioArgs,
      `--write_lat_log=${latLog}`,
      '--log_unix_epoch=1',
      '--output=/dev/null',
    ]);
    // Stopped by SIGINT, fio exits non-zero; its latency log is what is read.
    const ended = fio.then(
      () => undefined,
      () => undefined,
    );
    await new Promise((r) => setTimeout(r, leadMs));
    const startedEpoch = Date.now();
    const result = await event();
    await new Promise((r) => setTimeout(r, 1_000));
    fio.child.kill('SIGINT');
    await ended;
    const log = readLatLog(`${latLog}_clat.1.log`);
    const firstEpoch = log[0]?.[0] ?? startedEpoch;
    // The first half second is fio connecting and ramping up.
    const before = log.filter(([t]) => t >= firstEpoch + 500 && t < startedEpoch).map(([, l]) => l);
    const during = log
      .filter(([t]) => t >= startedEpoch && t <= result.endedEpoch)
      .map(([, l]) => l);
    return {
      ...result,
      p99BeforeUs: percentile(before, 99),
      p99DuringUs: percentile(during, 99),
      writesBefore: before.length,
      writesDuring: during.length,
    };
  } finally {
    rmSync(logDir, { recursive: true, force: true });
  }
}
