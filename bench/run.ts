// `npm run bench`: the reference fio jobs against a Lockstep export and, in the same run,
// against qemu-storage-daemon (../shared/bench/anchor-qemu.sh). Figures drift on shared
// machines, so what counts is each Lockstep figure as a ratio to its anchor from this run.
//
// usage: node dist/bench/run.js [--size 1G] [--runtime 10] [--shared-bench DIR]
//        [--fio-only | --baseline-only | --large-volumes-only | --snapshots-only | --establishment-only |
//         --move-only | --mediator-only | --failover-only | --tls-only | --install-only]
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  fsyncSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { AgentProcess } from '../test/harness/agent-process';
import {
  median,
  parseFioLines,
  ratioRows,
  rawLines,
  replicatedPair,
  replicatedRun,
  sh,
  type JobResult,
} from './fio-jobs';
import { waitFor } from '../test/harness/processes';
import { inSync, waitPeer } from '../test/harness/replication';
import { largeVolumesReport, largeVolumesRun } from './large-volumes';
import { snapshotsReport, snapshotsRun } from './snapshots';
import { establishmentReport, establishmentRun } from './establishment';
import { tlsReport, tlsRun } from './tls';
import { moveReport, moveRun } from './move';
import { mediatorReport, mediatorRun } from './mediator';
import { failoverReport, failoverRun } from './failover';
import { replicateToInSync } from './replicate';
import { installReport, installRun } from './install';

const execFileAsync = promisify(execFile);

function work2(): string {
  return mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-baseline-'));
}

/** Kill the replica, dirty 1 % of 1 GiB in 64 KiB writes, restart it, count what resync sends. */
async function resyncRun(): Promise<{
  writtenBytes: number;
  dirtyBytes: number;
  sentBytes: number;
}> {
  const [a, b, uri] = await replicatedPair('1G');
  try {
    await a.ctl('replicate', 'bench', '--to', b.grpcAddress);
    await waitPeer(a, 'bench', b, inSync, 'in sync', 300_000);
    await b.kill('SIGKILL');
    const blocks = 164; // 164 × 64 KiB ≈ 1 % of 1 GiB
    const cmds: string[] = [];
    for (let i = 0; i < blocks; i++)
      cmds.push('-c', `write -P ${i % 250} ${((i * 97) % 16384) * 65536} 64k`);
    await execFileAsync('qemu-io', ['-f', 'raw', ...cmds, uri], { maxBuffer: 16 << 20 });
    const behind = await waitPeer(a, 'bench', b, (p) => p.dirtyBytes >= blocks * 65536, 'dirty');
    await b.start();
    const done = await waitPeer(a, 'bench', b, inSync, 'in sync', 300_000);
    return {
      writtenBytes: blocks * 65536,
      dirtyBytes: behind.dirtyBytes,
      sentBytes: done.resyncBytesSent - behind.resyncBytesSent,
    };
  } finally {
    await a.dispose();
    await b.dispose();
  }
}

/** The same half-full 1 GiB image baselined by Lockstep, and copied by nbdcopy between two qemu exports. */
interface Baseline {
  lockstepSeconds: number;
  nbdcopySeconds: number;
}

async function baselineRun(dir: string): Promise<Baseline> {
  const half = 512 * 1024 * 1024;
  const chunk = Buffer.alloc(1024 * 1024);
  // Both copies start from data that is on disk (and still cached), as a volume that exists
  // before it is protected would be: not from 512 MiB of dirty pages whose writeback the first
  // reader pays for.
  const fill = (file: string) => {
    const fd = openSync(file, 'w');
    ftruncateSync(fd, 2 * half);
    for (let off = 0; off < half; off += chunk.length) {
      chunk.fill(off / chunk.length);
      writeSync(fd, chunk, 0, chunk.length, off);
    }
    fsyncSync(fd);
    closeSync(fd);
  };
  const procs: ChildProcess[] = [];
  try {
    // Anchor: qemu-storage-daemon exports src (half full) and tgt (empty); nbdcopy src → tgt.
    fill(path.join(dir, 'src.raw'));
    writeFileSync(path.join(dir, 'tgt.raw'), '');
    truncateSync(path.join(dir, 'tgt.raw'), 2 * half);
    for (const n of ['src', 'tgt']) {
      procs.push(
        spawn(
          'qemu-storage-daemon',
          [
            '--blockdev',
            `driver=file,node-name=${n}f,filename=${path.join(dir, `${n}.raw`)},aio=threads`,
            '--blockdev',
            `driver=raw,node-name=${n},file=${n}f`,
            '--nbd-server',
            `addr.type=unix,addr.path=${path.join(dir, `${n}.sock`)}`,
            '--export',
            `type=nbd,id=e,node-name=${n},writable=on,name=${n}`,
          ],
          { stdio: 'ignore' },
        ),
      );
    }
    await waitFor(
      'qemu exports',
      () =>
        Promise.resolve(
          existsSync(path.join(dir, 'src.sock')) && existsSync(path.join(dir, 'tgt.sock'))
            ? true
            : undefined,
        ),
      10_000,
    );
    const t0 = performance.now();
    // --flush: a baseline ends with the copy on disk (the replica vouches for it), so the
    // anchor's copy ends flushed too.
    await execFileAsync('nbdcopy', [
      '--flush',
      `nbd+unix:///src?socket=${path.join(dir, 'src.sock')}`,
      `nbd+unix:///tgt?socket=${path.join(dir, 'tgt.sock')}`,
    ]);
    const nbdcopySeconds = (performance.now() - t0) / 1000;

    // Plaintext, like the anchor's copy over unix sockets (over TLS: tls.ts).
    const [a, b] = await replicatedPair('1G', true);
    try {
      // The workload's half of the volume is written through the agent, as a workload would
      // (so the agent knows which extents hold data); nbdcopy skips the source's holes.
      await execFileAsync('nbdcopy', ['--flush', path.join(dir, 'src.raw'), a.uri('bench')]);
      // Timed from the Replicate call to the moment the agent saw the peer in sync (its own
      // clock, same host). Calls and polls are made in-process: a `lockstep ctl` process per
      // call would add a Node start-up (~0.2 s) and, polling, take CPU from the agents.
      const client = a.client();
      try {
        const { seconds } = await replicateToInSync(client, 'bench', b.grpcAddress);
        return { lockstepSeconds: seconds, nbdcopySeconds };
      } finally {
        client.close();
      }
    } finally {
      await a.dispose();
      await b.dispose();
    }
  } finally {
    for (const p of procs) p.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The reference jobs, `rounds` times: each round measures the anchor and Lockstep back to back;
 * ratios are taken within a round and the median across rounds is reported, since the
 * machine's speed drifts between rounds.
 */
async function fioRounds(
  fio: string,
  bench: string,
  size: string,
  runtime: string,
  rounds: number,
): Promise<JobResult[][]> {
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
      process.stderr.write(
        `round ${round}/${rounds}: lockstep, sync replication to a second agent\n`,
      );
      // Plaintext, like qemu-sync's mirror; replication over mTLS has its own section (tls.ts).
      results.push(...(await replicatedRun(fio, size, runtime, 'lockstep-sync', true)));
      perRound.push(results);
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return perRound;
}

/** The heading and table of the reference jobs' ratios. */
function fioTable(
  perRound: JobResult[][],
  size: string,
  runtime: string,
  rounds: number,
): string[] {
  const rows = ratioRows(perRound, [
    ['lockstep-local', 'qemu-local'],
    ['lockstep-sync', 'qemu-sync'],
  ]);
  const when = new Date().toISOString().slice(0, 16).replace('T', ' ');
  return [
    `### ${when} UTC — ${size}, ${runtime} s per job, ${rounds} round(s), ${os.cpus().length} cores`,
    '',
    'Medians over rounds: ours / anchor → median of the per-round ratios. rand4k-fsync-qd1 is a',
    'commit loop (each write followed by a FLUSH): its IOPS are commits/s, its latencies the FLUSH’s.',
    '',
    '| pair | job | IOPS | MB/s | p50 µs | p99 µs |',
    '|---|---|---|---|---|---|',
    ...rows,
    '',
  ];
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      runtime: { type: 'string', default: '10' },
      rounds: { type: 'string', default: '1' },
      // Only the reference fio jobs against qemu, local and replicated, once per round.
      'fio-only': { type: 'boolean', default: false },
      // Only the baseline comparison, once per round: for working on the baseline alone.
      'baseline-only': { type: 'boolean', default: false },
      // Only the large-volume section (8 TiB replicate, a 1 TiB baseline beside a workload).
      'large-volumes-only': { type: 'boolean', default: false },
      // Only the snapshot section (first writes, create and delete, changed maps) and its anchors.
      'snapshots-only': { type: 'boolean', default: false },
      // Only establishing a replica under fio (bytes sent, the writes' p99), and the idle baseline.
      'establishment-only': { type: 'boolean', default: false },
      // Only moving a group's primary to a third agent under load (bytes to the replica left).
      'move-only': { type: 'boolean', default: false },
      // Only the mediator's compare-and-swap latency with 10,000 groups.
      'mediator-only': { type: 'boolean', default: false },
      // Only replication over mutual TLS against plaintext and qemu's mirror over TLS.
      'tls-only': { type: 'boolean', default: false },
      // Only the image's size, --version in it, an agent's RSS at rest, helm install on kwok.
      'install-only': { type: 'boolean', default: false },
      // Only failover through a mediator: unplanned failover time, the stall a replica's death
      // causes (--rounds of each; default 10).
      'failover-only': { type: 'boolean', default: false },
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
  const baselineLine = (round: number, b: Baseline) =>
    `round${round} baseline lockstep_s=${b.lockstepSeconds.toFixed(3)} nbdcopy_s=${b.nbdcopySeconds.toFixed(3)} ratio=${(b.nbdcopySeconds / b.lockstepSeconds).toFixed(2)}`;
  if (values['fio-only']) {
    const perRound = await fioRounds(fio, bench, size, runtime, rounds);
    process.stdout.write(
      [...fioTable(perRound, size, runtime, rounds), '```', ...rawLines(perRound), '```', ''].join(
        '\n',
      ),
    );
    return;
  }
  if (values['baseline-only']) {
    for (let round = 1; round <= rounds; round++)
      process.stdout.write(`${baselineLine(round, await baselineRun(work2()))}\n`);
    return;
  }
  if (values['large-volumes-only']) {
    for (let round = 1; round <= rounds; round++)
      process.stdout.write(`round ${round}: ${largeVolumesReport(await largeVolumesRun())}\n`);
    return;
  }
  if (values['establishment-only']) {
    process.stdout.write(`${establishmentReport(await establishmentRun())}\n`);
    for (let round = 1; round <= rounds; round++)
      process.stdout.write(`${baselineLine(round, await baselineRun(work2()))}\n`);
    return;
  }
  if (values['move-only']) {
    for (const regionSize of [64 * 1024, 4096])
      process.stdout.write(`${moveReport(await moveRun(regionSize))}\n`);
    return;
  }
  if (values['mediator-only']) {
    for (const clients of [8, 64])
      process.stdout.write(`${mediatorReport(await mediatorRun(clients))}\n`);
    return;
  }
  if (values['failover-only']) {
    const n = values.rounds === '1' ? 10 : rounds;
    process.stdout.write(`${failoverReport(await failoverRun(n))}\n`);
    return;
  }
  if (values['tls-only']) {
    const work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-tls-'));
    try {
      process.stdout.write(`${tlsReport(await tlsRun(bench, work, size, runtime, rounds))}\n`);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
    return;
  }
  if (values['install-only']) {
    process.stdout.write(`${installReport(await installRun())}\n`);
    return;
  }
  if (values['snapshots-only']) {
    process.stdout.write(`${snapshotsReport(await snapshotsRun(bench))}\n`);
    return;
  }

  const perRound = await fioRounds(fio, bench, size, runtime, rounds);

  process.stderr.write('resync after dirtying 1% of 1 GiB\n');
  const resync = await resyncRun();
  // The baseline is a sub-second copy, so one run says little: a pair per round, as above.
  const baselines: Baseline[] = [];
  for (let round = 1; round <= rounds; round++) {
    process.stderr.write(`round ${round}/${rounds}: baseline of a half-full 1 GiB volume\n`);
    baselines.push(await baselineRun(work2()));
  }
  const baselineRatios = baselines.map((b) => b.nbdcopySeconds / b.lockstepSeconds);
  process.stderr.write(
    'large volumes: a fresh 8 TiB replicate, a 1 TiB baseline beside a writer\n',
  );
  const large = await largeVolumesRun();
  const snapshots = await snapshotsRun(bench);
  const establishment = await establishmentRun();
  const moves = [await moveRun(64 * 1024), await moveRun(4096)];
  const mediator = [await mediatorRun(8), await mediatorRun(64)];
  const failover = await failoverRun(10);
  const tlsWork = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-tls-'));
  const overTls = await tlsRun(bench, tlsWork, size, runtime, rounds).finally(() =>
    rmSync(tlsWork, { recursive: true, force: true }),
  );
  const install = await installRun();

  process.stdout.write(
    [
      ...fioTable(perRound, size, runtime, rounds),
      `Resync after dirtying 1 % of 1 GiB (${resync.writtenBytes} bytes written while the replica was down): ` +
        `${resync.sentBytes} bytes sent for ${resync.dirtyBytes} dirty bytes → **${(resync.sentBytes / resync.dirtyBytes).toFixed(2)}×** the dirty bytes.`,
      '',
      `Baseline of a half-full 1 GiB volume: lockstep ${median(baselines.map((b) => b.lockstepSeconds)).toFixed(2)} s, ` +
        `nbdcopy between two qemu exports ${median(baselines.map((b) => b.nbdcopySeconds)).toFixed(2)} s → throughput ratio **${median(baselineRatios).toFixed(2)}** ` +
        `(median of ${rounds}; per round: ${baselineRatios.map((r) => r.toFixed(2)).join(', ')}).`,
      '',
      largeVolumesReport(large),
      '',
      snapshotsReport(snapshots),
      '',
      establishmentReport(establishment),
      '',
      ...moves.map(moveReport),
      '',
      ...mediator.map(mediatorReport),
      '',
      failoverReport(failover),
      '',
      tlsReport(overTls),
      '',
      installReport(install),
      '',
      'Raw lines:',
      '```',
      ...rawLines(perRound),
      ...baselines.map((b, i) => baselineLine(i + 1, b)),
      '```',
      '',
    ].join('\n'),
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
