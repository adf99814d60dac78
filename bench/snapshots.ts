// Snapshots: what a snapshot costs the writes made under it, and how fast the operations on
// snapshots are. Figures drift on these machines, so each is set against a reference from the
// same run: QEMU's qcow2 under the same writes (../shared/bench/anchor-snapshot.sh, plus a
// whole-cluster overlay run made here), or the same Lockstep volume without the snapshot.
//   1. anchor-snapshot.sh at qd1 and qd16 (256 MiB, 4096 writes of 4 KiB, one per 64 KiB);
//   2. the same `qemu-img bench` writes into a fully written 256 MiB Lockstep volume just after
//      a snapshot (first), then again (rewrite); whole 64 KiB regions the same way (qd16, set
//      against a qcow2 overlay's whole clusters); the saved data per byte overwritten;
//   3. create latency in-process (AgentClient: no process start), on 1 GiB and 64 GiB sparse
//      volumes, with the writes' hold time, against qcow2's internal snapshot;
//   4. sync 4k qd16 on a replicated pair: without a snapshot, while one fills, with 250;
//   5. deleting the oldest snapshot, and a middle one holding what a fio run saved, under fio;
//   6. enumerating `lockstep:changed:<snapshot>` of a 1 TiB volume with nbdinfo: 0.1 % changed
//      in scattered 4 KiB blocks, then 1 % in runs of 1 MiB.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { AgentClient } from '../lib/agent-client';
import { NbdClient } from '../lib/nbd-client';
import { AgentProcess } from '../test/harness/agent-process';
import { waitFor } from '../test/harness/processes';
import { percentile } from '../test/harness/qd1-writer';
import { eventLoopDelayMs } from './event-loop-delay';
import { latencyAround } from './latency-window';

const execFileAsync = promisify(execFile);

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
/** The anchor's workload: a 256 MiB image, 4096 writes, one per 64 KiB region. */
const IMAGE_MIB = 256;
const WRITES = 4096;
const REGION = 64 * 1024;
const CREATES = 50;
const MANY = 250;
const FIO_SECONDS = 10;
/** The diff run writes one 4 KiB block per 4 MiB of the 1 TiB volume: 262,144 blocks. */
const DIFF_STRIDE = 4 * MiB;
/** Then 1 % in runs: 1 MiB per 100 MiB (10,486 runs, 2.7 M blocks, 11 GB of data). */
const RUN_BYTES = MiB;
const RUN_STRIDE = 100 * MiB;

// ---- reference figures ------------------------------------------------------------------

/** What anchor-snapshot.sh printed for one queue depth. */
export interface QcowAnchor {
  qd: number;
  overlayRatio: number;
  overlayAllocatedMib: number;
  extl2Ratio: number;
  extl2AllocatedMib: number;
  internalCreateMs: number;
  internalRatio: number;
  lines: string[];
}

export function parseAnchorSnapshot(text: string, qd: number): QcowAnchor {
  const field = (re: RegExp): number => {
    const m = re.exec(text);
    if (!m) throw new Error(`anchor-snapshot.sh output lacks ${re.source}:\n${text}`);
    return Number(m[1]);
  };
  return {
    qd,
    overlayRatio: field(/^qcow2-overlay .*ratio=([\d.]+)/m),
    overlayAllocatedMib: field(/^qcow2-overlay .*allocated_mib=(\d+)/m),
    extl2Ratio: field(/^qcow2-extl2 .*ratio=([\d.]+)/m),
    extl2AllocatedMib: field(/^qcow2-extl2 .*allocated_mib=(\d+)/m),
    internalCreateMs: field(/^qcow2-internal create_ms=([\d.]+)/m),
    internalRatio: field(/^qcow2-internal first_s=.*ratio=([\d.]+)/m),
    lines: text.trim().split('\n'),
  };
}

async function anchorRun(sharedBench: string, qd: number): Promise<QcowAnchor> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-snapanchor-'));
  try {
    const { stdout } = await execFileAsync(
      'bash',
      [path.join(sharedBench, 'anchor-snapshot.sh'), `${IMAGE_MIB}`, `${WRITES}`, `${qd}`],
      { env: { ...process.env, D: dir } },
    );
    process.stderr.write(stdout);
    return parseAnchorSnapshot(stdout, qd);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Seconds of one `qemu-img bench` run of WRITES writes of `blockBytes`, one per 64 KiB region,
 * timed around the process as anchor-snapshot.sh times it.
 */
async function imgBench(
  target: string,
  format: 'raw' | 'qcow2',
  blockBytes: number,
  qd: number,
): Promise<number> {
  const t0 = performance.now();
  await execFileAsync('qemu-img', [
    'bench',
    '-w',
    '-t',
    'none',
    '-s',
    `${blockBytes}`,
    '-S',
    `${REGION}`,
    '-c',
    `${WRITES}`,
    '-d',
    `${qd}`,
    '-f',
    format,
    target,
  ]);
  return (performance.now() - t0) / 1000;
}

interface FirstWrite {
  blockBytes: number;
  qd: number;
  firstS: number;
  rewriteS: number;
  /** What the snapshot saved for the first writes, and what they overwrote. */
  savedBytes: number;
  overwrittenBytes: number;
}

/**
 * The reference for whole-region writes, which anchor-snapshot.sh does not make: whole 64 KiB
 * clusters written into a fresh qcow2 overlay need no copy of old data.
 */
async function qcowWholeRegion(qds: number[]): Promise<FirstWrite[]> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-snapregion-'));
  try {
    const base = path.join(dir, 'base.raw');
    await execFileAsync('qemu-img', ['create', '-q', '-f', 'raw', base, `${IMAGE_MIB}M`]);
    await execFileAsync('qemu-io', ['-f', 'raw', '-c', `write -P 0xab 0 ${IMAGE_MIB}M`, base]);
    const out: FirstWrite[] = [];
    for (const qd of qds) {
      const overlay = path.join(dir, `ov${qd}.qcow2`);
      await execFileAsync('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        '-b',
        base,
        '-F',
        'raw',
        overlay,
      ]);
      const firstS = await imgBench(overlay, 'qcow2', REGION, qd);
      const rewriteS = await imgBench(overlay, 'qcow2', REGION, qd);
      out.push({
        blockBytes: REGION,
        qd,
        firstS,
        rewriteS,
        savedBytes: NaN,
        overwrittenBytes: WRITES * REGION,
      });
    }
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- Lockstep on one agent ----------------------------------------------------------------

/**
 * A fully written 256 MiB volume, a snapshot, then the anchor's writes twice: the first pay for
 * saving the old data, the second are plain overwrites.
 */
async function firstWriteRun(
  agent: AgentProcess,
  client: AgentClient,
  blockBytes: number,
  qd: number,
): Promise<FirstWrite> {
  const volume = `fw-${blockBytes / 1024}k-qd${qd}`;
  await client.createVolume(volume, IMAGE_MIB * MiB);
  const uri = agent.uri(volume);
  await execFileAsync('qemu-io', ['-f', 'raw', '-c', `write -P 0xab 0 ${IMAGE_MIB}M`, uri]);
  await client.createSnapshot(volume, 'snap');
  const firstS = await imgBench(uri, 'raw', blockBytes, qd);
  const [snap] = await client.listSnapshots(volume);
  const rewriteS = await imgBench(uri, 'raw', blockBytes, qd);
  return {
    blockBytes,
    qd,
    firstS,
    rewriteS,
    savedBytes: Number(snap.savedBytes),
    overwrittenBytes: WRITES * blockBytes,
  };
}

interface CreateLatency {
  volumeBytes: number;
  /** Each CreateSnapshot call, as the client saw it. */
  callMs: number[];
  /** How long the agent held the volume's writes for each cut. */
  holdMs: number[];
  /** The agent's event-loop delay, largest and p99, over the series. */
  eventLoopMaxMs: number;
  eventLoopP99Ms: number;
}

async function createSeries(
  agent: AgentProcess,
  client: AgentClient,
  volumeBytes: number,
): Promise<CreateLatency> {
  const volume = `cr-${volumeBytes / GiB}g`;
  await client.createVolume(volume, volumeBytes);
  const callMs: number[] = [];
  const holdMs: number[] = [];
  await eventLoopDelayMs(agent);
  for (let i = 0; i < CREATES; i++) {
    const t0 = performance.now();
    const s = await client.createSnapshot(volume, `s${i}`);
    callMs.push(performance.now() - t0);
    holdMs.push(s.holdMs);
  }
  const loop = await eventLoopDelayMs(agent);
  return { volumeBytes, callMs, holdMs, eventLoopMaxMs: loop.maxMs, eventLoopP99Ms: loop.p99Ms };
}

/** `lockstep ctl snapshot create` as a user runs it: the counterpart of qemu-img's create_ms. */
async function ctlCreates(agent: AgentProcess, n: number): Promise<number[]> {
  await agent.ctl('volume', 'create', 'ctl', '--size', '1GiB');
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await agent.ctl('snapshot', 'create', 'ctl', `c${i}`);
    ms.push(performance.now() - t0);
  }
  return ms;
}

interface LocalRuns {
  firstWrites: FirstWrite[];
  creates: CreateLatency[];
  ctlCreateMs: number[];
}

async function localRuns(): Promise<LocalRuns> {
  const agent = await new AgentProcess({ node: 'bench-snap', metrics: true }).start();
  const client = agent.client();
  try {
    const firstWrites: FirstWrite[] = [];
    for (const [blockBytes, qd] of [
      [4096, 1],
      [4096, 16],
      // Whole regions at qd16 only: at qd1 they take ~25 s here and tell the same (8.0× against
      // 8.6× at qd16 in the first run).
      [REGION, 16],
    ]) {
      process.stderr.write(`  first writes: ${blockBytes / 1024} KiB at qd${qd}\n`);
      firstWrites.push(await firstWriteRun(agent, client, blockBytes, qd));
    }
    process.stderr.write(`  ${CREATES} creates on 1 GiB and 64 GiB sparse volumes\n`);
    const creates = [
      await createSeries(agent, client, 1 * GiB),
      await createSeries(agent, client, 64 * GiB),
    ];
    return { firstWrites, creates, ctlCreateMs: await ctlCreates(agent, 3) };
  } finally {
    client.close();
    await agent.dispose();
  }
}

// ---- a replicated pair under fio ----------------------------------------------------------

interface FioResult {
  iops: number;
  p50Us: number;
  p99Us: number;
}

/**
 * The reference rand4k-qd16 job of ../shared/bench/fio-nbd.sh (which always runs all four
 * jobs), through fio's nbd engine.
 */
export function rand4kArgs(uri: string, seconds: number): string[] {
  return [
    '--name=rand4k-qd16',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    '--size=1G',
    '--time_based',
    `--runtime=${seconds}`,
  ];
}

async function fioRand4k(uri: string, seconds: number): Promise<FioResult> {
  const out = path.join(os.tmpdir(), `lockstep-bench-fio-${process.pid}-${Date.now()}.json`);
  try {
    await execFileAsync('fio', [
      ...rand4kArgs(uri, seconds),
      '--output-format=json',
      `--output=${out}`,
    ]);
    const job = (
      JSON.parse(readFileSync(out, 'utf8')) as {
        jobs: {
          write: { iops: number; clat_ns: { percentile?: Record<string, number> } };
        }[];
      }
    ).jobs[0].write;
    const p = job.clat_ns.percentile ?? {};
    return {
      iops: job.iops,
      p50Us: (p['50.000000'] ?? NaN) / 1000,
      p99Us: (p['99.000000'] ?? NaN) / 1000,
    };
  } finally {
    rmSync(out, { force: true });
  }
}

interface MiddleDelete {
  savedBytes: number;
  callMs: number;
  reclaimMs: number;
  /** fio's write p99 before the delete, and from the delete until the reclaim ended. */
  p99BeforeUs: number;
  p99DuringUs: number;
  writesBefore: number;
  writesDuring: number;
}

interface OldestDelete {
  savedBytes: number;
  callMs: number;
  /** Until its log file was gone. */
  reclaimMs: number;
}

interface ReplicatedRuns {
  /** A volume of the same pair that never has a snapshot, run before and after the others. */
  withoutBefore: FioResult;
  oneFilling: FioResult;
  many: FioResult;
  withoutAfter: FioResult;
  manyCreateMs: number[];
  middle: MiddleDelete;
  oldest: OldestDelete[];
}

function snapshotsDir(agent: AgentProcess, volume: string): string {
  return path.join(agent.dataDir, 'volumes', volume, 'snapshots');
}

/** Resolves when no deleted snapshot's log is left in the volume's directory. */
function reclaimed(agent: AgentProcess, volume: string, timeoutMs = 120_000): Promise<number> {
  const dir = snapshotsDir(agent, volume);
  return waitFor(
    `${volume} snapshots reclaimed`,
    () =>
      Promise.resolve(
        readdirSync(dir).some((f) => f.endsWith('.deleted')) ? undefined : performance.now(),
      ),
    timeoutMs,
    5,
  );
}

async function savedBytesOf(client: AgentClient, volume: string, name: string): Promise<number> {
  const s = (await client.listSnapshots(volume)).find((x) => x.name === name);
  return Number(s?.savedBytes ?? NaN);
}

/** 250 snapshots, each after a few 4 KiB writes, as fast as they can be taken. */
async function manySnapshots(
  agent: AgentProcess,
  client: AgentClient,
  volume: string,
): Promise<number[]> {
  const nbd = await NbdClient.connect({ socketPath: agent.nbdSocket }, volume, {
    timeoutMs: 60_000,
  });
  const data = Buffer.alloc(4096, 0x5c);
  const ms: number[] = [];
  try {
    for (let i = 0; i < MANY; i++) {
      for (let w = 0; w < 4; w++)
        await nbd.write(Math.floor(Math.random() * (GiB / 4096)) * 4096, data);
      const t0 = performance.now();
      await client.createSnapshot(volume, `many-${i}`);
      ms.push(performance.now() - t0);
    }
  } finally {
    await nbd.close();
  }
  return ms;
}

/**
 * fio writes; after 4 s the middle snapshot is deleted (its blocks are copied into its
 * predecessor in the background), and fio is stopped a second after the reclaim ended.
 */
async function middleDelete(
  agent: AgentProcess,
  client: AgentClient,
  volume: string,
  name: string,
): Promise<MiddleDelete> {
  const savedBytes = await savedBytesOf(client, volume, name);
  const m = await latencyAround(rand4kArgs(agent.uri(volume), 120), 4_000, async () => {
    const startedEpoch = Date.now();
    const t0 = performance.now();
    await client.deleteSnapshot(volume, name);
    const callMs = performance.now() - t0;
    const reclaimMs = (await reclaimed(agent, volume)) - t0;
    return { callMs, reclaimMs, endedEpoch: startedEpoch + reclaimMs };
  });
  return {
    savedBytes,
    callMs: m.callMs,
    reclaimMs: m.reclaimMs,
    p99BeforeUs: m.p99BeforeUs,
    p99DuringUs: m.p99DuringUs,
    writesBefore: m.writesBefore,
    writesDuring: m.writesDuring,
  };
}

async function oldestDeletes(
  agent: AgentProcess,
  client: AgentClient,
  volume: string,
  n: number,
): Promise<OldestDelete[]> {
  const out: OldestDelete[] = [];
  for (let i = 0; i < n; i++) {
    const [oldest] = await client.listSnapshots(volume);
    const savedBytes = Number(oldest.savedBytes);
    const t0 = performance.now();
    await client.deleteSnapshot(volume, oldest.name);
    const callMs = performance.now() - t0;
    const reclaimMs = (await reclaimed(agent, volume)) - t0;
    out.push({ savedBytes, callMs, reclaimMs });
  }
  return out;
}

/**
 * Two 1 GiB volumes on a replicated pair, both fully written (so that a first write after a
 * snapshot saves real data) and in sync: `plain` never has a snapshot, `bench` gets them. The
 * runs alternate between the two, so that each ratio is of runs minutes apart at most.
 */
async function replicatedRuns(): Promise<ReplicatedRuns> {
  const a = await new AgentProcess({ node: 'bench-snap-a' }).start();
  const b = await new AgentProcess({ node: 'bench-snap-b' }).start();
  const client = a.client();
  const volumes = ['plain', 'bench'];
  try {
    for (const volume of volumes) {
      await client.createVolume(volume, 1 * GiB);
      await execFileAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1G', a.uri(volume)]);
      await a.ctl('replicate', volume, '--to', b.grpcAddress);
    }
    try {
      await waitFor(
        'replicas in sync',
        async () => {
          for (const volume of volumes) {
            const p = (await client.getVolume(volume)).replication?.peers[0];
            if (p?.state !== 'InSync' || Number(p.dirtyBytes) !== 0)
              throw new Error(`${volume}: ${p?.state} ${p?.reason} dirty=${p?.dirtyBytes}`);
          }
          return true;
        },
        180_000,
        100,
      );
    } catch (err) {
      const tail = (agent: AgentProcess) => agent.proc.log().split('\n').slice(-15).join('\n');
      throw new Error(`${String(err)}\nprimary:\n${tail(a)}\nreplica:\n${tail(b)}`);
    }
    const run = (volume: string, what: string) => {
      process.stderr.write(`  sync rand4k-qd16, ${what} (${FIO_SECONDS} s)\n`);
      return fioRand4k(a.uri(volume), FIO_SECONDS);
    };
    const withoutBefore = await run('plain', 'a volume without snapshots');
    await client.createSnapshot('bench', 'one');
    const oneFilling = await run('bench', 'while one snapshot fills');
    process.stderr.write(`  ${MANY} snapshots, each after 4 writes\n`);
    const manyCreateMs = await manySnapshots(a, client, 'bench');
    const many = await run('bench', `with ${MANY + 1} snapshots`);
    const withoutAfter = await run('plain', 'a volume without snapshots, again');
    // The newest of the 250 holds what that run saved; one more snapshot puts it in the middle.
    await client.createSnapshot('bench', 'after');
    process.stderr.write('  deleting a middle snapshot under fio\n');
    const middle = await middleDelete(a, client, 'bench', `many-${MANY - 1}`);
    process.stderr.write('  deleting the oldest snapshot, 21 times\n');
    const oldest = await oldestDeletes(a, client, 'bench', 21);
    return { withoutBefore, oneFilling, many, withoutAfter, manyCreateMs, middle, oldest };
  } finally {
    client.close();
    await a.dispose();
    await b.dispose();
  }
}

// ---- diff enumeration ---------------------------------------------------------------------

interface DiffMap {
  volumeBytes: number;
  changedBlocks: number;
  writeSeconds: number;
  extents: number;
  /** nbdinfo --map, process included: first after the writes, again, and of an empty diff. */
  coldMs: number;
  warmMs: number;
  emptyMs: number;
  /** base:allocation of the same volume: as many extents, from the allocation map. */
  allocationMs: number;
  allocationExtents: number;
  eventLoopMaxMs: number;
  onTmpfs: boolean;
}

/** 1 % of another 1 TiB volume changed in runs of 1 MiB: the map first and again. */
interface RunsMap {
  changedBlocks: number;
  extents: number;
  writeSeconds: number;
  coldMs: number;
  warmMs: number;
  eventLoopMaxMs: number;
}

/** nbdinfo --map of a context, timed around the process; its extents and the flagged bytes. */
async function nbdinfoMap(
  context: string,
  uri: string,
): Promise<{ ms: number; extents: number; flaggedBytes: number }> {
  const t0 = performance.now();
  const { stdout } = await execFileAsync('nbdinfo', [`--map=${context}`, uri], {
    maxBuffer: 256 * MiB,
  });
  const ms = performance.now() - t0;
  let extents = 0;
  let flaggedBytes = 0;
  for (const line of stdout.split('\n')) {
    const [, length, flags] = line.trim().split(/\s+/);
    if (flags === undefined) continue;
    extents++;
    if (Number(flags) !== 0) flaggedBytes += Number(length);
  }
  return { ms, extents, flaggedBytes };
}

/**
 * A new 1 TiB volume, its snapshot `base`, then one pass of fio writing `bytes` at the start of
 * every `stride`; the seconds the writes took.
 */
async function writeAfterBase(
  agent: AgentProcess,
  volume: string,
  bytes: number,
  stride: number,
  iodepth: number,
): Promise<number> {
  const client = agent.client();
  try {
    await client.createVolume(volume, 1 * TiB);
    await client.createSnapshot(volume, 'base');
  } finally {
    client.close();
  }
  const t0 = performance.now();
  await execFileAsync('fio', [
    `--name=${volume}`,
    '--ioengine=nbd',
    `--uri=${agent.uri(volume)}`,
    `--rw=write:${(stride - bytes) / 1024}k`,
    `--bs=${bytes / 1024}k`,
    `--iodepth=${iodepth}`,
    '--size=1T',
    // One pass: without it fio keeps writing (wrapping around) until it has written `size`.
    `--io_size=${Math.floor(TiB / stride) * bytes}`,
    '--output-format=terse',
  ]);
  return (performance.now() - t0) / 1000;
}

/**
 * A 1 TiB volume, a snapshot, one 4 KiB write per 4 MiB (0.1 % of the blocks, every one its
 * own extent), then the changed map. The agent keeps its files on tmpfs when there is one: the
 * map is computed from the logs' in-memory index and reads no data, and this disk is mounted
 * with `discard`, where unlinking a file of 262,144 scattered extents takes minutes.
 */
async function diffRun(): Promise<DiffMap> {
  const onTmpfs = existsSync('/dev/shm');
  const dataDir = mkdtempSync(
    path.join(onTmpfs ? '/dev/shm' : os.tmpdir(), 'lockstep-bench-diff-'),
  );
  const agent = await new AgentProcess({ node: 'bench-diff', dataDir, metrics: true }).start();
  const client = agent.client();
  try {
    const volume = 'diff';
    const uri = agent.uri(volume);
    const writeSeconds = await writeAfterBase(agent, volume, 4096, DIFF_STRIDE, 32);
    // Nothing changes after it: the floor (process start, handshake, one request per 4 GiB).
    await client.createSnapshot(volume, 'after');
    await eventLoopDelayMs(agent);
    const cold = await nbdinfoMap('lockstep:changed:base', uri);
    const loop = await eventLoopDelayMs(agent);
    const warm = await nbdinfoMap('lockstep:changed:base', uri);
    const empty = await nbdinfoMap('lockstep:changed:after', uri);
    const allocation = await nbdinfoMap('base:allocation', uri);
    return {
      volumeBytes: 1 * TiB,
      changedBlocks: cold.flaggedBytes / 4096,
      writeSeconds,
      extents: cold.extents,
      coldMs: cold.ms,
      warmMs: warm.ms,
      emptyMs: empty.ms,
      allocationMs: allocation.ms,
      allocationExtents: allocation.extents,
      eventLoopMaxMs: loop.maxMs,
      onTmpfs,
    };
  } finally {
    client.close();
    await agent.dispose();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/**
 * 1 % of a 1 TiB volume changed after a snapshot, in runs: 2.7 M blocks in the logs' index but
 * only 10,486 extents, so the map's cost is building the runs, not sending them. Its own agent
 * keeps its files on disk: the 11 GB written need not fit in memory, and its extents are few.
 */
async function changedInRuns(): Promise<RunsMap> {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-runs-'));
  const agent = await new AgentProcess({ node: 'bench-runs', dataDir, metrics: true }).start();
  try {
    const volume = 'runs';
    const uri = agent.uri(volume);
    const writeSeconds = await writeAfterBase(agent, volume, RUN_BYTES, RUN_STRIDE, 8);
    // The 11 GB written back first: the map is measured, not the disk's writeback under it.
    await execFileAsync('sync');
    await eventLoopDelayMs(agent);
    const cold = await nbdinfoMap('lockstep:changed:base', uri);
    const loop = await eventLoopDelayMs(agent);
    const warm = await nbdinfoMap('lockstep:changed:base', uri);
    return {
      changedBlocks: cold.flaggedBytes / 4096,
      extents: cold.extents,
      writeSeconds,
      coldMs: cold.ms,
      warmMs: warm.ms,
      eventLoopMaxMs: loop.maxMs,
    };
  } finally {
    await agent.dispose();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

// ---- the section --------------------------------------------------------------------------

export interface Snapshots {
  /** Seconds each part took, and the machine's load average at the start and the end. */
  phases: [string, number][];
  load: [number, number];
  anchors: QcowAnchor[];
  qcowRegion: FirstWrite[];
  local: LocalRuns;
  replicated: ReplicatedRuns;
  diff: DiffMap;
  runs: RunsMap;
}

export async function snapshotsRun(sharedBench: string): Promise<Snapshots> {
  const loadBefore = os.loadavg()[0];
  const phases: [string, number][] = [];
  const phase = async <T>(name: string, work: () => Promise<T>): Promise<T> => {
    process.stderr.write(`snapshots: ${name}\n`);
    const t0 = performance.now();
    try {
      return await work();
    } finally {
      phases.push([name.split(/[ ,]/)[0], (performance.now() - t0) / 1000]);
    }
  };
  const anchors: QcowAnchor[] = [];
  for (const qd of [1, 16])
    anchors.push(
      await phase(`anchor-qd${qd} (anchor-snapshot.sh ${IMAGE_MIB} ${WRITES} ${qd})`, () =>
        anchorRun(sharedBench, qd),
      ),
    );
  const qcowRegion = await phase('qcow2-64k, a qcow2 overlay under whole 64 KiB clusters', () =>
    qcowWholeRegion([16]),
  );
  const local = await phase('local, lockstep on one agent', localRuns);
  const replicated = await phase('replicated, lockstep on a replicated pair', replicatedRuns);
  const diff = await phase('diff, the changed map of a 1 TiB volume', diffRun);
  const runs = await phase('runs, the changed map of 1 % of 1 TiB in runs', changedInRuns);
  return {
    phases,
    load: [loadBefore, os.loadavg()[0]],
    anchors,
    qcowRegion,
    local,
    replicated,
    diff,
    runs,
  };
}

const f1 = (x: number) => x.toFixed(1);
const f2 = (x: number) => x.toFixed(2);
const met = (ok: boolean) => (ok ? 'yes' : '**no**');

/** The markdown table and raw lines for the report. */
export function snapshotsReport(r: Snapshots): string {
  const rows: string[] = [];
  const row = (...cells: string[]) => rows.push(`| ${cells.join(' | ')} |`);
  const ratio = (w: FirstWrite) => w.firstS / w.rewriteS;

  for (const a of r.anchors) {
    const w = r.local.firstWrites.find((x) => x.blockBytes === 4096 && x.qd === a.qd)!;
    row(
      `first 4 KiB write after a snapshot / rewrite, qd${a.qd}`,
      `${f2(ratio(w))}× (${f2(w.firstS)} s / ${f2(w.rewriteS)} s)`,
      `overlay ${f2(a.overlayRatio)}×, extended_l2 ${f2(a.extl2Ratio)}×, internal ${f2(a.internalRatio)}×`,
      `${f2(ratio(w) / a.overlayRatio)} (overlay), ${f2(ratio(w) / a.extl2Ratio)} (extended_l2)`,
      '—',
      '—',
    );
  }
  for (const q of r.qcowRegion) {
    const w = r.local.firstWrites.find((x) => x.blockBytes === REGION && x.qd === q.qd)!;
    row(
      `first whole-64 KiB write / rewrite, qd${q.qd}`,
      `${f2(ratio(w))}× (${f2(w.firstS)} s / ${f2(w.rewriteS)} s)`,
      `overlay ${f2(ratio(q))}× (${f2(q.firstS)} s / ${f2(q.rewriteS)} s)`,
      f2(ratio(w) / ratio(q)),
      '≤ 1.1×',
      met(ratio(w) <= 1.1),
    );
  }
  for (const w of r.local.firstWrites) {
    const space = w.savedBytes / w.overwrittenBytes;
    const a = r.anchors.find((x) => x.qd === w.qd);
    const anchor =
      w.blockBytes === 4096 && a
        ? `overlay ${f2((a.overlayAllocatedMib * MiB) / w.overwrittenBytes)}, extended_l2 ${f2((a.extl2AllocatedMib * MiB) / w.overwrittenBytes)}`
        : '—';
    row(
      `space: saved / overwritten, ${w.blockBytes / 1024} KiB qd${w.qd}`,
      f2(space),
      anchor,
      '—',
      '≤ 1.1',
      met(space <= 1.1),
    );
  }
  const internalCreate = Math.min(...r.anchors.map((a) => a.internalCreateMs));
  for (const c of r.local.creates) {
    const p99 = percentile(c.callMs, 99);
    row(
      `create, ${c.volumeBytes / GiB} GiB sparse: p50 / p99 in-process (hold p99)`,
      `${f1(percentile(c.callMs, 50))} / ${f1(p99)} ms (${percentile(c.holdMs, 99).toFixed(3)} ms)`,
      `qcow2 internal ${f1(internalCreate)} ms (with process start)`,
      '—',
      'p99 ≤ 5 ms',
      met(p99 <= 5),
    );
  }
  const ctl = percentile(r.local.ctlCreateMs, 50);
  row(
    '`lockstep ctl snapshot create` (with process start), median of 3',
    `${f1(ctl)} ms`,
    `qcow2 internal ${f1(internalCreate)} ms`,
    f2(ctl / internalCreate),
    '—',
    '—',
  );
  const rep = r.replicated;
  const filling = rep.oneFilling.iops / rep.withoutBefore.iops;
  row(
    'sync 4k qd16 IOPS, one snapshot filling / none (the run before)',
    `${rep.oneFilling.iops.toFixed(0)} / ${rep.withoutBefore.iops.toFixed(0)}`,
    '—',
    f2(filling),
    '≥ 0.8',
    met(filling >= 0.8),
  );
  const many = rep.many.iops / rep.oneFilling.iops;
  row(
    `sync 4k qd16 IOPS, ${MANY + 1} snapshots / 1 (the newest filling in both)`,
    `${rep.many.iops.toFixed(0)} / ${rep.oneFilling.iops.toFixed(0)}`,
    '—',
    f2(many),
    '≈ 1 (0.9–1.1)',
    met(many >= 0.9 && many <= 1.1),
  );
  const manyWithout = rep.many.iops / rep.withoutAfter.iops;
  row(
    `sync 4k qd16 IOPS, ${MANY + 1} snapshots / none (the run after)`,
    `${rep.many.iops.toFixed(0)} / ${rep.withoutAfter.iops.toFixed(0)}`,
    '—',
    f2(manyWithout),
    '≥ 0.8',
    met(manyWithout >= 0.8),
  );
  const drift = rep.withoutAfter.iops / rep.withoutBefore.iops;
  row(
    'sync 4k qd16 IOPS, no snapshot: the run after / the run before (the machine’s drift)',
    `${rep.withoutAfter.iops.toFixed(0)} / ${rep.withoutBefore.iops.toFixed(0)}`,
    '—',
    f2(drift),
    '—',
    '—',
  );
  const del = rep.oldest.map((d) => d.callMs);
  row(
    `delete the oldest snapshot: p50 / max of ${del.length} calls`,
    `${f1(percentile(del, 50))} / ${f1(Math.max(...del))} ms`,
    '—',
    '—',
    '≤ 10 ms',
    met(Math.max(...del) <= 10),
  );
  const m = rep.middle;
  const mid = m.p99DuringUs / m.p99BeforeUs;
  row(
    `sync 4k qd16 write p99 while a middle snapshot (${f1(m.savedBytes / MiB)} MiB) is reclaimed / before`,
    `${m.p99DuringUs.toFixed(0)} / ${m.p99BeforeUs.toFixed(0)} µs`,
    '—',
    f2(mid),
    '≤ 1.2',
    met(mid <= 1.2),
  );
  const d = r.diff;
  row(
    `changed map of 1 TiB, ${((d.changedBlocks * 4096 * 100) / d.volumeBytes).toFixed(3)} % changed in scattered 4 KiB blocks: nbdinfo --map, first / again`,
    `${f1(d.coldMs)} / ${f1(d.warmMs)} ms`,
    `unchanged map ${f1(d.emptyMs)} ms; base:allocation, ${d.allocationExtents} extents: ${f1(d.allocationMs)} ms`,
    f2(d.coldMs / d.emptyMs),
    '< 100 ms (1 % changed)',
    `${met(d.coldMs < 100)} (at 0.1 %)`,
  );
  const dr = r.runs;
  row(
    `changed map of 1 TiB, ${((dr.changedBlocks * 4096 * 100) / d.volumeBytes).toFixed(2)} % changed in ${dr.extents >> 1} runs of 1 MiB: nbdinfo --map, first / again`,
    `${f1(dr.coldMs)} / ${f1(dr.warmMs)} ms`,
    `unchanged map ${f1(d.emptyMs)} ms`,
    f2(dr.coldMs / d.emptyMs),
    '< 100 ms (1 % changed)',
    met(dr.coldMs < 100),
  );

  const dels = rep.oldest;
  const raw = [
    `snapshot-bench load1=${f2(r.load[0])}..${f2(r.load[1])} ${r.phases.map(([n, sec]) => `${n}_s=${f1(sec)}`).join(' ')}`,
    ...r.anchors.flatMap((a) => a.lines.map((l) => `anchor-qd${a.qd} ${l}`)),
    ...r.qcowRegion.map(
      (q) =>
        `qcow2-overlay-64k qd=${q.qd} first_s=${q.firstS.toFixed(4)} rewrite_s=${q.rewriteS.toFixed(4)} ratio=${f2(ratio(q))}`,
    ),
    ...r.local.firstWrites.map(
      (w) =>
        `lockstep-first bs=${w.blockBytes} qd=${w.qd} first_s=${w.firstS.toFixed(4)} rewrite_s=${w.rewriteS.toFixed(4)} ratio=${f2(ratio(w))} saved_bytes=${w.savedBytes} overwritten_bytes=${w.overwrittenBytes}`,
    ),
    ...r.local.creates.map(
      (c) =>
        `lockstep-create volume_gib=${c.volumeBytes / GiB} n=${c.callMs.length} p50_ms=${f2(percentile(c.callMs, 50))} p99_ms=${f2(percentile(c.callMs, 99))} max_ms=${f2(Math.max(...c.callMs))} hold_p50_ms=${percentile(c.holdMs, 50).toFixed(3)} hold_p99_ms=${percentile(c.holdMs, 99).toFixed(3)} eventloop_max_ms=${f1(c.eventLoopMaxMs)} eventloop_p99_ms=${f1(c.eventLoopP99Ms)}`,
    ),
    `lockstep-ctl-create ms=${r.local.ctlCreateMs.map(f1).join(',')}`,
    ...(
      [
        ['plain snapshots=0', rep.withoutBefore],
        ['bench snapshots=1', rep.oneFilling],
        [`bench snapshots=${MANY + 1}`, rep.many],
        ['plain snapshots=0', rep.withoutAfter],
      ] as const
    ).map(
      ([what, x]) =>
        `lockstep-sync-rand4k-qd16 ${what} iops=${x.iops.toFixed(0)} p50_us=${x.p50Us.toFixed(0)} p99_us=${x.p99Us.toFixed(0)}`,
    ),
    `lockstep-create-many n=${rep.manyCreateMs.length} p50_ms=${f2(percentile(rep.manyCreateMs, 50))} p99_ms=${f2(percentile(rep.manyCreateMs, 99))} max_ms=${f2(Math.max(...rep.manyCreateMs))}`,
    `lockstep-delete-middle saved_bytes=${m.savedBytes} call_ms=${f2(m.callMs)} reclaim_ms=${f1(m.reclaimMs)} p99_before_us=${m.p99BeforeUs.toFixed(0)} p99_during_us=${m.p99DuringUs.toFixed(0)} writes_before=${m.writesBefore} writes_during=${m.writesDuring}`,
    ...dels.map(
      (x, i) =>
        `lockstep-delete-oldest i=${i} saved_bytes=${x.savedBytes} call_ms=${f2(x.callMs)} reclaimed_ms=${f2(x.reclaimMs)}`,
    ),
    `lockstep-changed-map volume_bytes=${d.volumeBytes} changed_blocks=${d.changedBlocks} extents=${d.extents} write_s=${f1(d.writeSeconds)} cold_ms=${f1(d.coldMs)} warm_ms=${f1(d.warmMs)} unchanged_ms=${f1(d.emptyMs)} allocation_ms=${f1(d.allocationMs)} allocation_extents=${d.allocationExtents} eventloop_max_ms=${f1(d.eventLoopMaxMs)} tmpfs=${d.onTmpfs}`,
    `lockstep-changed-runs changed_blocks=${r.runs.changedBlocks} extents=${r.runs.extents} write_s=${f1(r.runs.writeSeconds)} cold_ms=${f1(r.runs.coldMs)} warm_ms=${f1(r.runs.warmMs)} eventloop_max_ms=${f1(r.runs.eventLoopMaxMs)}`,
  ];
  return [
    `Snapshots (\`--snapshots-only\`, part of \`npm run bench\`; ${IMAGE_MIB} MiB images, ${WRITES} writes one per 64 KiB, as \`anchor-snapshot.sh\`; ` +
      `load average ${f1(r.load[0])} at the start, ${f1(r.load[1])} at the end, on ${os.cpus().length} cores):`,
    '',
    '| figure | ours | anchor | ratio | target | met? |',
    '|---|---|---|---|---|---|',
    ...rows,
    '',
    'Raw lines:',
    '```',
    ...raw,
    '```',
  ].join('\n');
}
