// Clones seen through real clients: a clone reads its snapshot at once (even where the source
// was overwritten since), keeps its own writes, whole, partial and zeroes, while the source, the
// snapshot and a snapshot of the clone stay as they were, and matches a reference image built
// here once hydrated; writes made while hydration copies their blocks survive it; the snapshot
// and the source cannot be deleted while the clone reads from them, and can be once it stands
// alone; a SIGKILL during hydration loses no acknowledged write, turns no unacknowledged one
// into anything but the snapshot's bytes or its own, and hydration resumes; a clone of a
// replicated volume is built on the peer from its own copy of the snapshot, with no data sent,
// then replicated.
//
// Hydration copies the source's chunks in order from offset 0 and costs about the same for a
// chunk holding one written block as for a full one; "ballast" (one block in every MiB) keeps it
// busy for seconds, and the data a test looks at lies past the ballast, so hydration reaches it
// only long after the checks.
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  truncateSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AgentClient } from '../../lib/agent-client';
import { type VolumeInfo } from '../../lib/agent-client';
import { isLockstepError } from '../../lib/errors';
import { AgentProcess, run, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import {
  ProxiedReplica,
  expectIdentical,
  expectSameImages,
  inSync,
  peerOf,
  waitPeer,
  type VolumeJson,
} from '../harness/replication';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const BLOCK = 4 * KiB;

/** `length` bytes of `byte` at `offset`: what qemu-io's `write -P` writes and `read -P` checks. */
interface Fill {
  offset: number;
  length: number;
  byte: number;
}

const fill = (offset: number, length: number, byte: number): Fill => ({ offset, length, byte });

/** One written block at the start of every MiB of [fromMiB, toMiB), a different byte in each. */
function ballast(fromMiB: number, toMiB: number): Fill[] {
  const fills: Fill[] = [];
  for (let i = fromMiB; i < toMiB; i++) fills.push(fill(i * MiB, BLOCK, 1 + (i % 200)));
  return fills;
}

/** What [offset, +length) holds after `fills` (later ones win, zeroes elsewhere), in runs. */
function runsOf(fills: Fill[], offset: number, length: number): Fill[] {
  const end = offset + length;
  const cuts = new Set([offset, end]);
  for (const f of fills)
    for (const p of [f.offset, f.offset + f.length]) if (p > offset && p < end) cuts.add(p);
  const points = [...cuts].sort((x, y) => x - y);
  const runs: Fill[] = [];
  for (let i = 0; i + 1 < points.length; i++) {
    const at = points[i];
    const byte = fills.findLast((f) => f.offset <= at && at < f.offset + f.length)?.byte ?? 0;
    const last = runs.at(-1);
    if (last && last.byte === byte) last.length += points[i + 1] - at;
    else runs.push(fill(at, points[i + 1] - at, byte));
  }
  return runs;
}

/** The whole blocks around a write, one more on each side: where its neighbours must survive. */
function around(f: Fill, size: number): [number, number] {
  const start = Math.max(0, (Math.floor(f.offset / BLOCK) - 1) * BLOCK);
  const end = Math.min(size, (Math.ceil((f.offset + f.length) / BLOCK) + 1) * BLOCK);
  return [start, end - start];
}

/** qemu-io writes of the fills; a fill of zeroes is a WRITE_ZEROES. */
const writes = (fills: Fill[]) =>
  fills.map((f) =>
    f.byte === 0
      ? `write -z ${f.offset} ${f.length}`
      : `write -P ${f.byte} ${f.offset} ${f.length}`,
  );

/** qemu-io `read -P` of every run the ranges should hold after `fills`. */
function reads(fills: Fill[], ranges: [number, number][]): string[] {
  return ranges.flatMap(([offset, length]) =>
    runsOf(fills, offset, length).map((r) => `read -P ${r.byte} ${r.offset} ${r.length}`),
  );
}

/** One qemu-io process running the commands in order; rejects if any fails (a pattern too). */
function qemuIo(uri: string, commands: string[], readOnly = false): Promise<string> {
  const args = ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...commands.flatMap((c) => ['-c', c])];
  return run('qemu-io', [...args, uri]);
}

/** A sparse local image holding `fills`: what a volume should read as. */
function referenceImage(file: string, size: number, fills: Fill[]): string {
  closeSync(openSync(file, 'w'));
  truncateSync(file, size);
  const fd = openSync(file, 'r+');
  try {
    for (const f of fills) writeSync(fd, Buffer.alloc(f.length, f.byte), 0, f.length, f.offset);
  } finally {
    closeSync(fd);
  }
  return file;
}

/** qemu-img compare of an export with a local image; rejects with the first difference. */
async function compareWith(uri: string, image: string): Promise<void> {
  const out = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, image]);
  if (!out.includes('Images are identical')) throw new Error(out);
}

/** Until the clone stands alone (no longer reads from its snapshot). */
function hydrated(client: AgentClient, name: string, timeoutMs = 60_000): Promise<VolumeInfo> {
  return waitFor(
    `clone ${name} hydrated`,
    async () => {
      const v = await client.getVolume(name);
      return v.cloneOf === '' ? v : undefined;
    },
    timeoutMs,
    200,
  );
}

/** The files that make a volume a clone; gone once it stands alone. */
function cloneFiles(agent: AgentProcess, name: string): string[] {
  const dir = path.join(agent.dataDir, 'volumes', name);
  return ['clone.json', 'present.log'].filter((f) => existsSync(path.join(dir, f)));
}

/** A replication gauge of the agent's, for one volume (and its only peer). */
/** Bytes the agent sent its peer for `volume`: live writes, or baseline and resync. */
async function sentBytes(agent: AgentProcess, kind: 'live' | 'resync', volume: string) {
  const text = await (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();
  const m = new RegExp(
    `^lockstep_replication_sent_bytes_total\\{volume="${volume}",[^}]*kind="${kind}"[^}]*\\} (\\d+)$`,
    'm',
  ).exec(text);
  if (!m) throw new Error(`no ${kind} bytes sent for ${volume} on ${agent.node}`);
  return Number(m[1]);
}

/** The rejection of `call`, which must be a LockstepError with `code`. */
async function refusal(call: Promise<unknown>, code: string): Promise<Error> {
  const err = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!isLockstepError(err) || err.code !== code)
    throw new Error(`expected ${code}, got ${err instanceof Error ? err.message : 'success'}`);
  return err;
}

/** ack_writer's 4 KiB pattern for a slot (see test/harness/ack_writer.py). */
function slotPattern(slot: number): Buffer {
  const unit = Buffer.alloc(16);
  unit.writeBigUInt64BE(BigInt(slot), 0);
  unit.writeBigUInt64BE(0x4c4f434b53544550n, 8);
  return Buffer.alloc(BLOCK, unit);
}

describe('clones', () => {
  const agents: AgentProcess[] = [];
  const clients: AgentClient[] = [];
  const replicas: ProxiedReplica[] = [];
  let scratch = '';
  const start = (node: string, metrics = false) => {
    const a = new AgentProcess({ node, metrics, extraArgs: ['--peer-timeout', '1500'] });
    agents.push(a);
    return a.start();
  };
  const clientOf = (agent: AgentProcess) => {
    const c = agent.client(30_000);
    clients.push(c);
    return c;
  };
  beforeEach(() => {
    scratch = mkdtempSync(path.join(os.tmpdir(), 'lockstep-clonetest-'));
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const a of agents.splice(0)) await a.dispose();
    for (const r of replicas.splice(0)) {
      await r.agent.dispose();
      await r.close();
    }
    if (!process.env.KEEP_AGENT_DIRS) rmSync(scratch, { recursive: true, force: true });
  });

  it('reads its snapshot at once, keeps whole, partial and zero writes, leaves the source and both snapshots alone, and matches a reference once hydrated', async () => {
    const a = await start('node-a');
    const client = clientOf(a);
    const size = GiB;
    await client.createVolume('v', size);
    // What the snapshot holds; past the ballast, hydration gets there seconds later.
    const snapshot = [
      ...ballast(0, 768),
      fill(896 * MiB, 4 * MiB, 0x11),
      fill(900 * MiB, 4 * MiB, 0x22),
      fill(1020 * MiB, 4 * MiB, 0x33),
    ];
    // The source moves on after the snapshot, also where the snapshot holds zeroes (904m).
    const later = [
      fill(896 * MiB, 2 * MiB, 0x99),
      fill(904 * MiB, 64 * KiB, 0x9b),
      fill(1023 * MiB, MiB, 0x9a),
    ];
    await qemuIo(a.uri('v'), writes(snapshot));
    await client.createSnapshot('v', 's');
    await qemuIo(a.uri('v'), writes(later));
    const source = [...snapshot, ...later];

    const made = JSON.parse(await a.ctl('clone', 'v', 's', 'c', '-o', 'json')) as VolumeJson & {
      cloneOf: string;
    };
    expect(made).toMatchObject({ name: 'c', cloneOf: 'v@s', readOnly: false });

    // Aligned, unaligned within a block, across a block boundary where the source changed,
    // over many blocks with both ends partial, in the snapshot's zeroes where the source wrote
    // since, in a never-written stretch, the volume's last partial block, and zeroes (whole
    // blocks and partial ones).
    const own = [
      fill(900 * MiB, 64 * KiB, 0xa1),
      fill(901 * MiB + 100, 1000, 0xa2),
      fill(897 * MiB + 4000, 200, 0xa4),
      fill(902 * MiB + 333, 100_000, 0xa5),
      fill(904 * MiB + 1000, 3000, 0xa3),
      fill(950 * MiB + 5, 10, 0xa7),
      fill(size - 700, 700, 0xa6),
      fill(903 * MiB + 512, 8192 + 100, 0),
      fill(1021 * MiB, 128 * KiB, 0),
    ];
    const clone = [...snapshot, ...own];
    const region: [number, number] = [896 * MiB, 128 * MiB];
    // A snapshot of the clone before its writes holds what it read then: its own snapshot's.
    await client.createSnapshot('c', 't');
    await qemuIo(a.uri('c'), [
      // The snapshot, not the source, where the source changed since.
      ...reads(snapshot, [region, [0, 4 * MiB]]),
      ...writes(own),
      // Each write, and the snapshot's bytes around it in its blocks.
      ...reads(
        clone,
        own.map((f) => around(f, size)),
      ),
      ...reads(clone, [region]),
    ]);
    const during = await client.getVolume('c');
    expect(during.cloneOf).toBe('v@s');
    // Hydration had not reached the region checked: those reads came through the snapshot.
    expect(during.hydratedPercent).toBeLessThan(85);
    expect(cloneFiles(a, 'c')).toEqual(['clone.json', 'present.log']);
    const shown = await a.ctl('status', 'c');
    expect(shown).toMatch(/^clone of: v@s \((\d+(\.\d)?)% hydrated\)$/m);

    // The source and the snapshot are untouched by the clone's writes.
    await qemuIo(a.uri('v'), reads(source, [region]), true);
    await qemuIo(a.uri('v@s'), reads(snapshot, [region]), true);
    await qemuIo(a.uri('c@t'), reads(snapshot, [region, [0, 4 * MiB]]), true);

    await hydrated(client, 'c');
    expect(cloneFiles(a, 'c')).toEqual([]);
    const status = JSON.parse(await a.ctl('status', 'c', '-o', 'json')) as {
      cloneOf: string;
      hydratedPercent: number;
    };
    expect(status).toMatchObject({ cloneOf: '', hydratedPercent: 100 });
    await compareWith(a.uri('c'), referenceImage(path.join(scratch, 'c.img'), size, clone));
    await qemuIo(a.uri('c@t'), reads(snapshot, [region]), true);
  });

  it('keeps writes made while hydration copies their blocks', async () => {
    const a = await start('node-a');
    const client = clientOf(a);
    await client.createVolume('v', 512 * MiB);
    // Every MiB holds data, so hydration reads and writes every chunk the writers write to.
    await qemuIo(a.uri('v'), writes(ballast(0, 512)));
    await client.createSnapshot('v', 's');
    await a.ctl('clone', 'v', 's', 'c');
    // Whole blocks in the first half, partial ones (1.5 KiB) in the second.
    const jobs = (extra: string[]) =>
      [
        ['whole', '4k', '0'],
        ['partial', '1536', '256M'],
      ].flatMap(([name, bs, offset]) => [
        `--name=${name}`,
        '--ioengine=nbd',
        `--uri=${a.uri('c')}`,
        '--rw=randwrite',
        `--bs=${bs}`,
        `--offset=${offset}`,
        '--size=256M',
        '--number_ios=5000',
        '--iodepth=8',
        '--randseed=7',
        '--verify=crc32c',
        '--verify_fatal=1',
        '--verify_state_save=0',
        ...extra,
      ]);
    // Hydration has only begun when the writers start.
    const before = await client.getVolume('c');
    expect(before.cloneOf).toBe('v@s');
    expect(before.hydratedPercent).toBeLessThan(50);
    await run('fio', jobs(['--do_verify=1']));
    await hydrated(client, 'c');
    // The same writes, read again once hydration is done with them.
    await run('fio', jobs(['--verify_only']));
  });

  it('refuses to delete the snapshot or the source while the clone reads from them, and deletes both once it is hydrated', async () => {
    const a = await start('node-a');
    const client = clientOf(a);
    await client.createVolume('v', GiB);
    const snapshot = ballast(0, 1024);
    await qemuIo(a.uri('v'), writes(snapshot));
    await client.createSnapshot('v', 's');
    await a.ctl('clone', 'v', 's', 'c');

    // Asked through the API a moment after the clone: hydration takes seconds.
    const inUse = 'LOCKSTEP_ERR_SNAPSHOT_IN_USE';
    const bySnapshot = await refusal(client.deleteSnapshot('v', 's', true), inUse);
    expect(bySnapshot.message).toMatch(/\bclone c\b/);
    const byVolume = await refusal(client.deleteVolume('v', true), inUse);
    expect(byVolume.message).toMatch(/\bclone c\b/);
    // And once through ctl (a second or so), for what a user sees.
    const err = await a.ctl('snapshot', 'delete', 'v', 's').then(
      () => undefined,
      (e: unknown) => e as Error & { stderr: string; exitCode: number },
    );
    expect(err?.exitCode).toBe(1);
    expect(err?.stderr).toContain(inUse);
    expect(err?.stderr).toMatch(/\bclone c\b/);
    const during = await client.getVolume('c');
    expect(during.cloneOf).toBe('v@s');
    expect(during.hydratedPercent).toBeLessThan(100);
    expect((await client.listSnapshots('v')).map((s) => s.name)).toEqual(['s']);
    await qemuIo(a.uri('v@s'), reads(snapshot, [[0, 8 * MiB]]), true);
    await qemuIo(a.uri('v'), reads(snapshot, [[0, 8 * MiB]]), true);

    await hydrated(client, 'c');
    await a.ctl('snapshot', 'delete', 'v', 's');
    expect(await client.listSnapshots('v')).toEqual([]);
    await a.ctl('volume', 'delete', 'v');
    expect((await client.listVolumes()).map((v) => v.name)).toEqual(['c']);
    await qemuIo(a.uri('c'), reads(snapshot, [[0, 8 * MiB]]));
    // It stands alone across a restart too.
    await a.stop();
    await a.start();
    expect((await client.getVolume('c')).cloneOf).toBe('');
    await compareWith(a.uri('c'), referenceImage(path.join(scratch, 'c.img'), GiB, snapshot));
  });

  it('keeps acknowledged writes and reads the snapshot elsewhere after a SIGKILL during hydration, which resumes', async () => {
    const a = await start('node-a');
    const client = clientOf(a);
    const size = GiB;
    await client.createVolume('v', size);
    // The writer writes 4 KiB slots of the first 64 MiB, where the snapshot holds data too.
    const span = (64 * MiB) / BLOCK;
    const snapshot = [fill(0, 64 * MiB, 0x5a), ...ballast(64, 1024)];
    await qemuIo(a.uri('v'), writes(snapshot));
    await client.createSnapshot('v', 's');
    await qemuIo(a.uri('v'), writes([fill(0, 128 * MiB, 0x77)]));
    await a.ctl('clone', 'v', 's', 'c');

    const log = path.join(scratch, 'acked.log');
    const writer = startAckWriter(a.uri('c'), log, span, 16, span);
    await waitFor(
      'acknowledged writes',
      () => Promise.resolve(readFileSync(log, 'utf8').split('\n').length > 1000 || undefined),
      30_000,
      50,
    );
    // Partial writes right before the kill, acknowledged when qemu-io returns.
    const own = [
      fill(600 * MiB + 100, 1000, 0xb1),
      fill(700 * MiB + 4000, 9000, 0xb2),
      fill(size - 3000, 2000, 0xb3),
    ];
    await qemuIo(a.uri('c'), writes(own));
    const before = await client.getVolume('c');
    await a.kill('SIGKILL');
    expect(await writer).toMatch(/connection lost/);
    expect(before.cloneOf).toBe('v@s');
    expect(before.hydratedPercent).toBeLessThan(60);
    expect(cloneFiles(a, 'c')).toEqual(['clone.json', 'present.log']);

    await a.start();
    const after = await client.getVolume('c');
    expect(after.cloneOf).toBe('v@s');
    expect(after.hydratedPercent).toBeGreaterThan(0);
    const clone = [...snapshot, ...own];
    const ranges = own.map((f) => around(f, size));
    await qemuIo(a.uri('c'), reads(clone, ranges));
    const acked = await verifyAckedWrites(a.uri('c'), log);
    expect(acked).toBeGreaterThan(1000);

    await hydrated(client, 'c');
    expect(cloneFiles(a, 'c')).toEqual([]);
    await verifyAckedWrites(a.uri('c'), log);
    // The whole clone: each slot the writer wrote holds its pattern, or (not acknowledged)
    // the snapshot's bytes; everything else is the snapshot's plus the partial writes.
    const dump = path.join(scratch, 'c.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', a.uri('c'), dump]);
    const reference = referenceImage(path.join(scratch, 'c.img'), size, clone);
    const loggedSlots = new Set(
      readFileSync(log, 'utf8')
        .split('\n')
        .filter((l) => l)
        .map(Number),
    );
    const mine = openSync(dump, 'r');
    const ref = openSync(reference, 'r');
    try {
      const got = Buffer.alloc(MiB);
      const want = Buffer.alloc(MiB);
      const bad: string[] = [];
      for (let pos = 0; pos < size && bad.length < 5; pos += MiB) {
        readSync(mine, got, 0, MiB, pos);
        readSync(ref, want, 0, MiB, pos);
        for (let o = 0; o < MiB && bad.length < 5; o += BLOCK) {
          const slot = (pos + o) / BLOCK;
          const block = got.subarray(o, o + BLOCK);
          const snap = want.subarray(o, o + BLOCK);
          const written = slot < span && block.equals(slotPattern(slot));
          if (loggedSlots.has(slot) ? !written : !written && !block.equals(snap))
            bad.push(
              `block at ${pos + o}${loggedSlots.has(slot) ? ' (acknowledged)' : ''} starts ` +
                block.subarray(0, 16).toString('hex'),
            );
        }
      }
      expect(bad).toEqual([]);
    } finally {
      closeSync(mine);
      closeSync(ref);
    }
  });

  it('builds a replicated volume’s clone on the peer from its own snapshot, sends no data for it, then replicates its writes', async () => {
    const a = await start('node-a', true);
    const replica = await ProxiedReplica.start('node-b');
    replicas.push(replica);
    const b = replica.agent;
    const peer = replica.asPeer;
    const client = clientOf(a);
    const size = 256 * MiB;
    await client.createVolume('v', size);
    await a.ctl('replicate', 'v', '--to', replica.address);
    await waitPeer(a, 'v', peer, inSync, 'in sync');
    const snapshot = [fill(0, 8 * MiB, 0x41), fill(100 * MiB, 4 * MiB, 0x42), ...ballast(128, 256)];
    await qemuIo(a.uri('v'), writes(snapshot));
    const taken = JSON.parse(await a.ctl('snapshot', 'create', 'v', 's', '-o', 'json')) as {
      copies: { node: string; state: string }[];
    };
    expect(taken.copies.map((c) => [c.node, c.state])).toEqual([
      ['node-a', 'Taken'],
      ['node-b', 'Taken'],
    ]);
    await qemuIo(a.uri('v'), writes([fill(0, 2 * MiB, 0x99)]));
    await waitPeer(a, 'v', peer, inSync, 'in sync after the writes');

    const dataBefore = replica.dataBytesForwarded;
    await a.ctl('clone', 'v', 's', 'c');
    const onB = JSON.parse(await b.ctl('status', 'c', '-o', 'json')) as VolumeJson & {
      cloneOf: string;
    };
    expect(onB).toMatchObject({ role: 'secondary', cloneOf: 'v@s' });
    const cloned = await waitPeer(a, 'c', peer, inSync, 'in sync on the clone');
    expect(cloned.resyncBytesSent).toBe(0);
    expect(cloned.liveBytesSent).toBe(0);
    expect(await sentBytes(a, 'resync', 'c')).toBe(0);
    expect(await sentBytes(a, 'live', 'c')).toBe(0);
    // On the wire: a baseline would carry the whole 256 MiB (every block of a clone may hold
    // data); handshakes and lane hellos are a few KiB.
    expect(replica.dataBytesForwarded - dataBefore).toBeLessThan(256 * KiB);

    const own = [
      fill(0, 64 * KiB, 0xc1),
      fill(MiB + 100, 1000, 0xc2),
      fill(100 * MiB + 3000, 5000, 0xc3),
      fill(size - 100, 100, 0xc4),
    ];
    await qemuIo(a.uri('c'), writes(own));
    const synced = await waitPeer(a, 'c', peer, inSync, 'in sync after the clone’s writes');
    expect(synced.resyncBytesSent).toBe(0);
    const written = own.reduce((n, f) => n + f.length, 0);
    expect(await sentBytes(a, 'live', 'c')).toBe(written);
    expect(replica.dataBytesForwarded - dataBefore).toBeGreaterThan(written);

    await hydrated(client, 'c');
    await hydrated(clientOf(b), 'c');
    expect((await peerOf(a, 'c', peer)).state).toBe('InSync');
    await expectIdentical(a, b, 'c');
    const image = referenceImage(path.join(scratch, 'c.img'), size, [...snapshot, ...own]);
    await compareWith(a.uri('c'), image);
    await expectSameImages(path.join(b.dataDir, 'volumes', 'c', 'data.img'), image);
  });
});
