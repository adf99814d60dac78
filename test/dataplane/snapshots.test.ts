// Snapshots of a volume against a real agent and real NBD clients: every snapshot exported as
// VOLUME@SNAPSHOT reads, byte for byte, as the volume did when it was taken (qemu-img compare
// against reference images built locally with qemu-io), through chains, deletes, rollbacks,
// SIGKILLs at each persistence step, and a disk too full to save old data.
import { spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  AgentProcess,
  ackWriter,
  run,
  startAckWriter,
  systemPython,
  verifyAckedWrites,
} from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import { NBD, RawNbd } from '../harness/raw-nbd';
import { SmallFilesystem } from '../harness/small-filesystem';

const KiB = 1024;
const MiB = 1024 * KiB;
const A = 0xaa;
const B = 0xbb;
const C = 0xcc;
const D = 0xdd;
const E = 0xee;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One qemu-io write of a pattern: [pattern, offset, length] in bytes. */
type Layer = [number, number, number];

interface SnapshotJson {
  volume: string;
  name: string;
  label: string;
  createdAtMs: number;
  savedBytes: number;
  exportUri: string;
  holdMs: number;
}

const writeCmd = ([p, off, len]: Layer) => `write -P 0x${p.toString(16)} ${off} ${len}`;
const readCmd = ([p, off, len]: Layer) => `read -P 0x${p.toString(16)} ${off} ${len}`;

/** qemu-io on an NBD URI or a file; rejects on any failed command. */
function qemuIo(target: string, cmds: string[], readOnly = false): Promise<string> {
  return run('qemu-io', [
    '-f',
    'raw',
    ...(readOnly ? ['-r'] : []),
    ...cmds.flatMap((c) => ['-c', c]),
    target,
  ]);
}

async function writeLayers(uri: string, layers: Layer[]): Promise<void> {
  await qemuIo(uri, layers.map(writeCmd));
}

/** Pattern checks with qemu-io, opened read-only: each [pattern, offset, length] must match. */
async function expectReads(uri: string, regions: Layer[]): Promise<void> {
  const out = await qemuIo(uri, regions.map(readCmd), true);
  expect(out).not.toMatch(/Pattern verification failed|error/i);
}

/** `qemu-img compare` of an export with a local raw image; rejects with the first mismatch. */
async function expectImage(uri: string, reference: string): Promise<void> {
  const out = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, reference]);
  expect(out).toContain('Images are identical');
}

/**
 * The snapshot logs in a volume's dir, without the spare made ahead for the next snapshot (its
 * header says prepared: it holds nothing and is removed if the agent restarts).
 */
function snapshotFiles(agent: AgentProcess, volume: string): string[] {
  const dir = path.join(agent.dataDir, 'volumes', volume, 'snapshots');
  return readdirSync(dir)
    .filter((f) => f.startsWith('snap-'))
    .filter((f) => !readFileSync(path.join(dir, f)).subarray(0, 512).includes('"prepared":true'))
    .sort();
}

async function listSnapshots(agent: AgentProcess, volume?: string): Promise<SnapshotJson[]> {
  const args = ['snapshot', 'list', ...(volume ? [volume] : []), '-o', 'json'];
  return (JSON.parse(await agent.ctl(...args)) as { snapshots: SnapshotJson[] }).snapshots;
}

/** Polls until the volume's snapshot directory holds exactly `files`. */
function waitForFiles(agent: AgentProcess, volume: string, files: string[]): Promise<string[]> {
  return waitFor(
    `${volume}'s snapshot logs to be ${files.join(', ') || 'none'}`,
    () => {
      const now = snapshotFiles(agent, volume);
      return Promise.resolve(now.join() === files.join() ? now : undefined);
    },
    30_000,
    50,
  );
}

/**
 * A real NBD client (libnbd) that stays attached until closed; on each line it reads one
 * block and says whether that worked.
 */
class AttachedClient {
  private out = '';

  private constructor(private readonly child: ChildProcess) {
    child.stdout!.on('data', (c: Buffer) => (this.out += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (this.out += c.toString()));
  }

  static async open(uri: string): Promise<AttachedClient> {
    const script = [
      'import nbd, sys',
      'h = nbd.NBD()',
      'h.connect_uri(sys.argv[1])',
      'print("attached", flush=True)',
      'for line in sys.stdin:',
      '    try:',
      '        h.pread(4096, 0)',
      '        print("read ok", flush=True)',
      '    except nbd.Error as e:',
      '        print("read failed: %s" % e, flush=True)',
    ].join('\n');
    const client = new AttachedClient(
      spawn(systemPython, ['-c', script, uri], { stdio: ['pipe', 'pipe', 'pipe'] }),
    );
    await waitFor(
      `an NBD client attached to ${uri}`,
      () => {
        if (client.child.exitCode !== null) throw new Error(`client exited: ${client.out}`);
        return Promise.resolve(client.out.includes('attached') || undefined);
      },
      30_000,
      20,
    );
    return client;
  }

  /** Asks for one read; resolves with the client's answer. */
  async read(): Promise<string> {
    const before = this.out.length;
    this.child.stdin!.write('\n');
    return waitFor(
      'the attached client to read',
      () => Promise.resolve(/read (ok|failed[^\n]*)/.exec(this.out.slice(before))?.[0]),
      30_000,
      20,
    );
  }

  /** Disconnects cleanly (libnbd sends NBD_CMD_DISC on exit). */
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.stdin!.end();
    await exited;
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}

describe('snapshots', () => {
  const agents: AgentProcess[] = [];
  const filesystems: SmallFilesystem[] = [];
  const clients: AttachedClient[] = [];
  // Reference images, writer logs, and the logs of agents whose disk fills up.
  let work: string;
  beforeEach(() => {
    work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-snapshots-'));
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.kill();
    for (const a of agents.splice(0)) await a.dispose();
    for (const f of filesystems.splice(0)) f.dispose();
    rmSync(work, { recursive: true, force: true });
  });

  const startAgent = async (opts: ConstructorParameters<typeof AgentProcess>[0] = {}) => {
    const agent = new AgentProcess({ node: 'node-snap', ...opts });
    agents.push(agent);
    return agent.start();
  };
  const attach = async (uri: string) => {
    const c = await AttachedClient.open(uri);
    clients.push(c);
    return c;
  };
  /** A raw image of `size` bytes holding `layers` written in order over zeroes. */
  let images = 0;
  const reference = async (size: number, layers: Layer[]): Promise<string> => {
    const file = path.join(work, `ref-${++images}.img`);
    await run('qemu-img', ['create', '-f', 'raw', file, String(size)]);
    if (layers.length > 0) await writeLayers(file, layers);
    return file;
  };
  const createSnapshot = async (agent: AgentProcess, volume: string, name: string) =>
    JSON.parse(await agent.ctl('snapshot', 'create', volume, name, '-o', 'json')) as SnapshotJson;

  it('reads as the volume did when taken, read-only, listed by nbdinfo; rollback restores it', async () => {
    const agent = await startAgent();
    const size = 16 * MiB;
    const uri = await agent.createVolume('v', '16MiB');
    const snapUri = agent.uri('v@s1');
    const stateA: Layer[] = [[A, 0, size]];
    // Whole blocks, runs across block edges, and writes within one block.
    const changes: Layer[] = [
      [B, 1 * MiB, 2 * MiB],
      [B, 8 * MiB - 4 * KiB, 12 * KiB],
      [B, 10 * MiB + 512, 1000],
      [B, size - 4 * KiB, 4 * KiB],
    ];
    await writeLayers(uri, stateA);
    const created = await createSnapshot(agent, 'v', 's1');
    expect(created).toMatchObject({ volume: 'v', name: 's1', savedBytes: 0, exportUri: snapUri });
    await writeLayers(uri, changes);

    await expectReads(snapUri, stateA);
    await expectReads(uri, [
      [A, 0, 1 * MiB],
      [B, 1 * MiB, 2 * MiB],
      [A, 3 * MiB, 5 * MiB - 4 * KiB],
      [B, 8 * MiB - 4 * KiB, 12 * KiB],
      [A, 8 * MiB + 8 * KiB, 2 * MiB - 8 * KiB + 512],
      [B, 10 * MiB + 512, 1000],
      [A, 10 * MiB + 1512, 6 * MiB - 1512 - 4 * KiB],
      [B, size - 4 * KiB, 4 * KiB],
    ]);
    const refA = await reference(size, stateA);
    await expectImage(snapUri, refA);
    await expectImage(uri, await reference(size, [...stateA, ...changes]));
    // Exactly the blocks first overwritten were saved: 512 + 3 + 1 + 1, with their records.
    const [listed] = await listSnapshots(agent, 'v');
    expect(listed.savedBytes).toBeGreaterThanOrEqual(517 * 4 * KiB);
    expect(listed.savedBytes).toBeLessThan(520 * 4 * KiB);

    const exports = await run('nbdinfo', ['--list', `nbd+unix://?socket=${agent.nbdSocket}`]);
    expect(exports).toMatch(/export="v":/);
    expect(exports).toMatch(/export="v@s1":\n(\t.*\n)*?\tis_read_only: true/);

    // Read-only: clients are told so, and a write sent anyway is refused with EPERM.
    await expect(qemuIo(snapUri, [writeCmd([C, 0, 4 * KiB])])).rejects.toThrow(
      /Permission denied|read-only/i,
    );
    const raw = await RawNbd.open(agent.nbdSocket, 'v@s1');
    raw.request(NBD.CMD_WRITE, 0, 4 * KiB, { payload: Buffer.alloc(4 * KiB, C) });
    expect((await raw.reply()).error).toBe(NBD.EPERM);
    raw.request(NBD.CMD_DISC, 0, 0);
    raw.destroy();
    await expectImage(snapUri, refA);

    const rolled = JSON.parse(await agent.ctl('snapshot', 'rollback', 'v', 's1', '-o', 'json')) as {
      name: string;
      state: string;
    };
    expect(rolled).toMatchObject({ name: 'v', state: 'Ready' });
    await expectImage(uri, refA);
    // The snapshot outlives its rollback and keeps its state under new writes.
    await writeLayers(uri, [[D, 4 * MiB, 4 * MiB]]);
    await expectImage(snapUri, refA);
    await expectImage(uri, await reference(size, [...stateA, [D, 4 * MiB, 4 * MiB]]));
  });

  it('reads each snapshot of a chain as taken, through deletes of the middle, oldest and newest', async () => {
    const agent = await startAgent();
    const size = 16 * MiB;
    const uri = await agent.createVolume('v', '16MiB');
    const s1: Layer[] = [[A, 0, size]];
    const s2: Layer[] = [...s1, [B, 0, 4 * MiB]];
    const s3: Layer[] = [...s2, [C, 2 * MiB, 8 * MiB]];
    const s4: Layer[] = [...s3, [D, 6 * MiB, 8 * MiB]];
    await writeLayers(uri, s1);
    await createSnapshot(agent, 'v', 's1');
    await writeLayers(uri, s2.slice(1));
    await createSnapshot(agent, 'v', 's2');
    await writeLayers(uri, s3.slice(2));
    await createSnapshot(agent, 'v', 's3');
    await writeLayers(uri, s4.slice(3));
    const refs = {
      s1: await reference(size, s1),
      s2: await reference(size, s2),
      s3: await reference(size, s3),
    };
    for (const [name, ref] of Object.entries(refs)) await expectImage(agent.uri(`v@${name}`), ref);
    await expectImage(uri, await reference(size, s4));
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['s1', 's2', 's3']);
    expect(snapshotFiles(agent, 'v')).toEqual(['snap-1.log', 'snap-2.log', 'snap-3.log']);

    // The middle one: s1 read [4m, 10m) through s2's log, which is merged into s1's.
    await agent.ctl('snapshot', 'delete', 'v', 's2');
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['s1', 's3']);
    await waitForFiles(agent, 'v', ['snap-1.log', 'snap-3.log']);
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s3'), refs.s3);
    await expect(qemuIo(agent.uri('v@s2'), ['read 0 4k'], true)).rejects.toThrow(
      /server reported: volume v has no snapshot "s2"/,
    );

    // The oldest: its log is unlinked.
    await agent.ctl('snapshot', 'delete', 'v', 's1');
    await waitForFiles(agent, 'v', ['snap-3.log']);
    await expectImage(agent.uri('v@s3'), refs.s3);

    // The newest with a predecessor: s3 receives first writes again, after s4's blocks it
    // lacks were merged into it.
    await createSnapshot(agent, 'v', 's4');
    const s5: Layer[] = [...s4, [E, 12 * MiB, 4 * MiB]];
    await writeLayers(uri, s5.slice(4));
    await agent.ctl('snapshot', 'delete', 'v', 's4');
    await waitForFiles(agent, 'v', ['snap-3.log']);
    await writeLayers(uri, [[E, 0, 1 * MiB]]);
    await expectImage(agent.uri('v@s3'), refs.s3);
    await expectImage(uri, await reference(size, [...s5, [E, 0, 1 * MiB]]));
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['s3']);
  });

  it('ctl prints JSON and clear errors, and respects attached clients', async () => {
    const agent = await startAgent();
    const uri = await agent.createVolume('v', '4MiB');
    await writeLayers(uri, [[A, 0, 4 * MiB]]);
    const created = JSON.parse(
      await agent.ctl('snapshot', 'create', 'v', 'daily.1', '--label', 'daily', '-o', 'json'),
    ) as SnapshotJson;
    expect(Object.keys(created).sort()).toEqual(
      [
        'copies',
        'createdAtMs',
        'exportUri',
        'holdMs',
        'label',
        'name',
        'savedBytes',
        'uid',
        'volume',
      ].sort(),
    );
    expect(created).toMatchObject({ volume: 'v', name: 'daily.1', label: 'daily' });
    expect(Math.abs(created.createdAtMs - Date.now())).toBeLessThan(60_000);
    expect(created.holdMs).toBeGreaterThanOrEqual(0);
    expect(await agent.ctl('snapshot', 'create', 'v', 's2')).toMatch(
      /^snapshot v@s2 created \(writes held [\d.]+ ms\): nbd\+unix:\/\/\/v@s2\?socket=/,
    );
    const listed = await listSnapshots(agent);
    expect(listed.map((s) => [s.volume, s.name, s.label])).toEqual([
      ['v', 'daily.1', 'daily'],
      ['v', 's2', ''],
    ]);
    expect(listed[0]).toMatchObject({
      createdAtMs: created.createdAtMs,
      exportUri: created.exportUri,
    });
    const table = await agent.ctl('snapshot', 'list', 'v');
    expect(table.split('\n')[0]).toMatch(/^VOLUME\s+NAME\s+LABEL\s+CREATED\s+SAVED\s+EXPORT$/);
    expect(table).toMatch(/v\s+daily\.1\s+daily\s+/);

    const refusals: [string[], RegExp][] = [
      [
        ['snapshot', 'create', 'v', 's2'],
        /already has a snapshot "s2".*LOCKSTEP_ERR_SNAPSHOT_EXISTS/,
      ],
      [
        ['snapshot', 'create', 'v', 'A@b'],
        /invalid snapshot name "A@b".*LOCKSTEP_ERR_INVALID_ARGUMENT/,
      ],
      [['snapshot', 'create', 'v', 'x/y'], /invalid snapshot name.*LOCKSTEP_ERR_INVALID_ARGUMENT/],
      [['snapshot', 'create', 'nope', 's'], /LOCKSTEP_ERR_VOLUME_NOT_FOUND/],
      [['snapshot', 'delete', 'v', 'nope'], /no snapshot "nope".*LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND/],
      [
        ['snapshot', 'rollback', 'v', 'nope'],
        /no snapshot "nope".*LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND/,
      ],
      [['snapshot', 'list', 'nope'], /LOCKSTEP_ERR_VOLUME_NOT_FOUND/],
    ];
    for (const [args, message] of refusals)
      await expect(agent.ctl(...args)).rejects.toThrow(message);
    await expect(qemuIo(agent.uri('v@nope'), ['read 0 4k'], true)).rejects.toThrow(
      /server reported: volume v has no snapshot "nope"/,
    );

    // Rollback is refused while a client uses the volume, and works once it detached.
    await writeLayers(uri, [[B, 0, 1 * MiB]]);
    const onVolume = await attach(uri);
    await expect(agent.ctl('snapshot', 'rollback', 'v', 's2')).rejects.toThrow(
      /1 NBD client\(s\) attached; detach them.*LOCKSTEP_ERR_VOLUME_IN_USE/,
    );
    expect(await onVolume.read()).toBe('read ok');
    await expectReads(uri, [[B, 0, 1 * MiB]]);
    await onVolume.close();
    await waitFor(
      'the client to be detached',
      async () =>
        (await agent.ctl('volume', 'list')).match(/^v\s+Ready\s+\S+\s+\S+\s+rw\s+0\s/m) ??
        undefined,
      30_000,
    );
    expect(await agent.ctl('snapshot', 'rollback', 'v', 's2')).toBe(
      'volume v rolled back to snapshot s2\n',
    );
    await expectImage(uri, await reference(4 * MiB, [[A, 0, 4 * MiB]]));

    // A snapshot being read is not deleted unless forced, which disconnects its reader.
    const reader = await attach(agent.uri('v@s2'));
    await expect(agent.ctl('snapshot', 'delete', 'v', 's2')).rejects.toThrow(
      /snapshot v@s2 has 1 NBD client\(s\) attached; disconnect them or use --force.*LOCKSTEP_ERR_SNAPSHOT_IN_USE/,
    );
    expect(await reader.read()).toBe('read ok');
    expect(
      JSON.parse(await agent.ctl('snapshot', 'delete', 'v', 's2', '--force', '-o', 'json')),
    ).toEqual({ volume: 'v', name: 's2', deleted: true });
    expect(await reader.read()).toMatch(/^read failed/);
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['daily.1']);
    expect(await agent.ctl('snapshot', 'delete', 'v', 'daily.1')).toBe(
      'snapshot v@daily.1 deleted\n',
    );
    expect(await listSnapshots(agent)).toEqual([]);
    await waitForFiles(agent, 'v', []);
  });

  it('keeps snapshots taken just before a SIGKILL, and both keep their state afterwards', async () => {
    const agent = await startAgent();
    const size = 8 * MiB;
    const uri = await agent.createVolume('v', '8MiB');
    const s1: Layer[] = [[A, 0, size]];
    const s2: Layer[] = [...s1, [B, 2 * MiB, 3 * MiB]];
    await writeLayers(uri, s1);
    await createSnapshot(agent, 'v', 's1');
    await writeLayers(uri, s2.slice(1));
    await agent.ctl('snapshot', 'create', 'v', 's2', '--label', 'before-kill');
    const before = await listSnapshots(agent, 'v');
    await agent.kill('SIGKILL');

    await agent.start();
    expect(await listSnapshots(agent, 'v')).toEqual(before);
    const refs = { s1: await reference(size, s1), s2: await reference(size, s2) };
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s2'), refs.s2);
    // The newest receives first writes after the restart.
    await writeLayers(uri, [[C, 0, size]]);
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s2'), refs.s2);
    expect((await listSnapshots(agent, 'v'))[1].savedBytes).toBeGreaterThanOrEqual(size);
  });

  it('keeps a snapshot exact when the agent is killed during a stream of first writes', async () => {
    const agent = await startAgent();
    const size = 64 * MiB;
    const uri = await agent.createVolume('v', '64MiB');
    await writeLayers(uri, [[A, 0, size]]);
    await createSnapshot(agent, 'v', 's1');
    const fio = run(
      'fio',
      [
        '--name=first-writes',
        '--ioengine=nbd',
        `--uri=${uri}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=16',
        `--size=${size}`,
        // Slow enough that it is still writing blocks for the first time when killed.
        '--rate_iops=4000',
        '--time_based',
        '--runtime=30',
        `--buffer_pattern=0x${B.toString(16)}`,
      ],
      { timeoutMs: 60_000 },
    ).catch((err: Error) => err);
    await waitFor(
      'first writes to be saved',
      async () => ((await listSnapshots(agent, 'v'))[0].savedBytes >= 1 * MiB ? true : undefined),
      30_000,
    );
    await agent.kill('SIGKILL');
    // fio loses its server mid-way: it fails rather than completing its 30 s.
    expect(await fio).toBeInstanceOf(Error);

    await agent.start();
    const [s1] = await listSnapshots(agent, 'v');
    expect(s1.savedBytes).toBeGreaterThanOrEqual(1 * MiB);
    expect(s1.savedBytes).toBeLessThan(size);
    await expectImage(agent.uri('v@s1'), await reference(size, [[A, 0, size]]));
    // Every block of the volume holds one write or the other, whole.
    const copy = path.join(work, 'volume.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, copy]);
    const data = readFileSync(copy);
    const blockA = Buffer.alloc(4 * KiB, A);
    const blockB = Buffer.alloc(4 * KiB, B);
    let written = 0;
    for (let off = 0; off < size; off += 4 * KiB) {
      const block = data.subarray(off, off + 4 * KiB);
      if (block.equals(blockB)) written++;
      else if (!block.equals(blockA)) throw new Error(`block at ${off} is neither A nor B`);
    }
    expect(written).toBeGreaterThan(0);
    // Every block that changed was saved before it did.
    expect(s1.savedBytes).toBeGreaterThanOrEqual(written * 4 * KiB);
  });

  it('finishes reclaiming a middle snapshot deleted just before a SIGKILL', async () => {
    const agent = await startAgent();
    const size = 32 * MiB;
    const uri = await agent.createVolume('v', '32MiB');
    // s1 reads [4m, 28m) through s2's log: 24 MiB to merge into s1's when s2 goes.
    const s1: Layer[] = [[A, 0, size]];
    const s2: Layer[] = [...s1, [B, 0, 1 * MiB]];
    const s3: Layer[] = [...s2, [C, 4 * MiB, 24 * MiB]];
    const now: Layer[] = [...s3, [D, 0, 512 * KiB], [D, 16 * MiB, 1 * MiB]];
    await writeLayers(uri, s1);
    await createSnapshot(agent, 'v', 's1');
    await writeLayers(uri, s2.slice(1));
    await createSnapshot(agent, 'v', 's2');
    await writeLayers(uri, s3.slice(2));
    await createSnapshot(agent, 'v', 's3');
    await writeLayers(uri, now.slice(3));
    await agent.ctl('snapshot', 'delete', 'v', 's2');
    await agent.kill('SIGKILL');

    await agent.start();
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['s1', 's3']);
    const refs = { s1: await reference(size, s1), s3: await reference(size, s3) };
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s3'), refs.s3);
    await waitForFiles(agent, 'v', ['snap-1.log', 'snap-3.log']);
    await writeLayers(uri, [[E, 0, size]]);
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s3'), refs.s3);
    // And again once reclaimed: nothing of s2 is needed any more.
    await agent.kill('SIGKILL');
    await agent.start();
    await expectImage(agent.uri('v@s1'), refs.s1);
    await expectImage(agent.uri('v@s3'), refs.s3);
    // A log is its header and its records: nothing grown ahead, nothing lost to the restarts.
    const { savedBytes } = (await listSnapshots(agent, 'v'))[1];
    const logSize = statSync(
      path.join(agent.dataDir, 'volumes', 'v', 'snapshots', 'snap-3.log'),
    ).size;
    expect(logSize).toBe(4 * KiB + savedBytes);
  });

  it('finishes a rollback interrupted by a SIGKILL before serving the volume', async () => {
    const agent = await startAgent();
    const size = 64 * MiB;
    const uri = await agent.createVolume('v', '64MiB');
    await writeLayers(uri, [[A, 0, size]]);
    await createSnapshot(agent, 'v', 's1');
    await writeLayers(uri, [[B, 0, 48 * MiB]]);
    const marker = path.join(agent.dataDir, 'volumes', 'v', 'snapshots', 'rollback.json');
    const rollback = agent
      .ctl('--timeout', '60', 'snapshot', 'rollback', 'v', 's1')
      .catch((err: Error) => err);
    // The rollback has begun once its intent is on disk; it then writes 48 MiB back.
    await waitFor(
      'the rollback to begin',
      () => Promise.resolve(existsSync(marker) || undefined),
      30_000,
      5,
    );
    await sleep(100);
    await agent.kill('SIGKILL');
    expect(await rollback).toBeInstanceOf(Error);

    await agent.start();
    expect(agent.proc.log()).toContain('finishing an interrupted rollback');
    expect(existsSync(marker)).toBe(false);
    const refA = await reference(size, [[A, 0, size]]);
    await expectImage(uri, refA);
    await expectImage(agent.uri('v@s1'), refA);
  });

  it('keeps every acknowledged write; a snapshot taken among them holds exactly those before its cut', async () => {
    const agent = await startAgent();
    const uri = await agent.createVolume('v', '128MiB');
    const log = path.join(work, 'acked.log');
    const ackedLines = () =>
      existsSync(log) ? readFileSync(log, 'utf8').split('\n').slice(0, -1) : [];
    const slotsFile = (name: string, lines: string[]) => {
      const file = path.join(work, name);
      writeFileSync(file, lines.map((l) => `${l}\n`).join(''));
      return file;
    };
    const depth = 16;
    const writer = startAckWriter(uri, log, 32768, depth);
    await waitFor(
      'acknowledged writes',
      () => Promise.resolve(ackedLines().length >= 500 || undefined),
      30_000,
      20,
    );
    const beforeCut = ackedLines();
    await createSnapshot(agent, 'v', 's1');
    const atReturn = ackedLines().length;
    const afterCount = 500;
    await waitFor(
      `${afterCount} acknowledged writes after the snapshot`,
      () => {
        const n = ackedLines().length - atReturn;
        if (n < afterCount) throw new Error(`${n} so far`);
        return Promise.resolve(true);
      },
      60_000,
      20,
    );
    await agent.kill('SIGKILL');
    expect(await writer).toMatch(/connection lost/);

    await agent.start();
    const acked = ackedLines();
    expect(await verifyAckedWrites(uri, log)).toBe(acked.length);
    const snapUri = agent.uri('v@s1');
    // Acknowledged before the snapshot was asked for: in it.
    expect(await verifyAckedWrites(snapUri, slotsFile('before.log', beforeCut))).toBe(
      beforeCut.length,
    );
    // Acknowledged while it was taken: in it or not, but whole.
    const during = await classifySlots(
      snapUri,
      slotsFile('during.log', acked.slice(beforeCut.length, atReturn)),
    );
    expect(during.other).toBe(0);
    // Acknowledged after it returned: sent after the cut, except the few in flight then.
    const after = await classifySlots(snapUri, slotsFile('after.log', acked.slice(atReturn)));
    expect(after.other).toBe(0);
    expect(after.written).toBeLessThanOrEqual(depth);
    expect(after.zero).toBeGreaterThanOrEqual(acked.length - atReturn - depth);
  });

  it('fails a write whose old data cannot be saved with ENOSPC, keeps the snapshot, and recovers once space is freed', async () => {
    const fs = SmallFilesystem.create(64, 0);
    filesystems.push(fs);
    const dataDir = path.join(fs.mountPoint, 'agent');
    mkdirSync(dataDir);
    const logDir = path.join(work, 'logs');
    mkdirSync(logDir);
    const agent = await startAgent({ dataDir, logDir });
    const size = 16 * MiB;
    const uri = await agent.createVolume('v', '16MiB');
    await writeLayers(uri, [[A, 0, size]]);
    await createSnapshot(agent, 'v', 's1');
    fillDisk(path.join(fs.mountPoint, 'ballast'));
    expect(fs.freeBytes()).toBeLessThan(1 * MiB);

    await expect(writeLayers(uri, [[B, 0, size]])).rejects.toThrow(
      /write failed: No space left on device/,
    );
    const refA = await reference(size, [[A, 0, size]]);
    await expectImage(agent.uri('v@s1'), refA);

    fs.dropBallast();
    await writeLayers(uri, [[B, 0, size]]);
    await expectImage(agent.uri('v@s1'), refA);
    const refB = await reference(size, [[B, 0, size]]);
    await expectImage(uri, refB);

    // A rollback also saves what it overwrites (for s2): with room to record that it began but
    // not for the 16 MiB it must save, it fails and stays pending, and the snapshot it reads
    // cannot be deleted until it is finished. (The 1 MiB left also covers a spare log the
    // agent may still be making ahead.)
    await createSnapshot(agent, 'v', 's2');
    fillDisk(path.join(fs.mountPoint, 'ballast'), 1 * MiB);
    await expect(agent.ctl('snapshot', 'rollback', 'v', 's1')).rejects.toThrow(
      /LOCKSTEP_ERR_NO_SPACE/,
    );
    await expect(agent.ctl('snapshot', 'delete', 'v', 's1')).rejects.toThrow(
      /being rolled back to snapshot s1; finish the rollback.*LOCKSTEP_ERR_SNAPSHOT_IN_USE/,
    );
    await expectImage(agent.uri('v@s2'), refB);
    fs.dropBallast();
    await agent.ctl('snapshot', 'rollback', 'v', 's1');
    await expectImage(uri, refA);
    await agent.ctl('snapshot', 'delete', 'v', 's1');
    await agent.kill('SIGKILL');
    await agent.start();
    expect((await listSnapshots(agent, 'v')).map((s) => s.name)).toEqual(['s2']);
    await expectImage(agent.uri('v@s2'), refB);
    await expectImage(uri, refA);
  });
});

/**
 * Writes (really, not sparse) into `file` until the filesystem has no space left, then gives
 * `leave` bytes back.
 */
function fillDisk(file: string, leave = 0): void {
  const fd = openSync(file, 'w');
  try {
    for (const chunk of [Buffer.alloc(1 * MiB, 0x42), Buffer.alloc(4 * KiB, 0x42)]) {
      for (;;) {
        try {
          if (writeSync(fd, chunk) < chunk.length) break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break;
          throw err;
        }
      }
    }
    if (leave > 0) ftruncateSync(fd, Math.max(0, fstatSync(fd).size - leave));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** How the slots listed in `file` read through `uri`: ack_writer's pattern, zeroes, or else. */
async function classifySlots(
  uri: string,
  file: string,
): Promise<{ written: number; zero: number; other: number }> {
  const script = [
    'import json, sys',
    'import nbd',
    'sys.path.insert(0, sys.argv[1])',
    'from ack_writer import SLOT, pattern',
    'h = nbd.NBD()',
    'h.connect_uri(sys.argv[2])',
    'counts = {"written": 0, "zero": 0, "other": 0}',
    'for line in open(sys.argv[3]):',
    '    if not line.strip():',
    '        continue',
    '    slot = int(line)',
    '    data = h.pread(SLOT, slot * SLOT)',
    '    kind = "written" if data == pattern(slot) else "zero" if data == bytes(SLOT) else "other"',
    '    counts[kind] += 1',
    'print(json.dumps(counts))',
  ].join('\n');
  const out = await run(systemPython, ['-c', script, path.dirname(ackWriter), uri, file]);
  return JSON.parse(out) as { written: number; zero: number; other: number };
}
