// Structured replies and block status (base:allocation) against the clients that use them:
// nbdinfo, qemu-img, nbdcopy and libnbd see the holes and the data of a sparse volume exactly,
// copy only the data, and get identical images; and, over a raw socket, the spec's rules for
// negotiating metadata contexts and for structured read and error replies.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, run, systemPython } from '../harness/agent-process';
import { NBD, RawNbd } from '../harness/raw-nbd';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const EXTENT = 64 * KiB;
const DATA = 0;
const HOLE_ZERO = 3;

/** The writes that make the volume: a pattern byte over a range. */
const WRITES: [offset: number, length: number, byte: number][] = [
  [0, 64 * KiB, 0xaa],
  [1 * MiB, 128 * KiB, 0xbb],
  [5_000_000, 10, 0xcc], // 10 bytes make their whole 64 KiB extent data
  [SIZE - 4 * KiB, 4 * KiB, 0xdd],
];

/** The volume's status: written 64 KiB extents are data, the rest holes that read as zeroes. */
const MAP: [offset: number, length: number, flags: number][] = [
  [0, 64 * KiB, DATA],
  [64 * KiB, MiB - 64 * KiB, HOLE_ZERO],
  [MiB, 128 * KiB, DATA],
  [MiB + 128 * KiB, 4_980_736 - MiB - 128 * KiB, HOLE_ZERO],
  [4_980_736, EXTENT, DATA], // the extent holding byte 5,000,000
  [4_980_736 + EXTENT, SIZE - EXTENT - 4_980_736 - EXTENT, HOLE_ZERO],
  [SIZE - EXTENT, EXTENT, DATA],
];
const DATA_BYTES = MAP.filter(([, , f]) => f === DATA).reduce((sum, [, n]) => sum + n, 0);

function image(): Buffer {
  const img = Buffer.alloc(SIZE);
  for (const [offset, length, byte] of WRITES) img.fill(byte, offset, offset + length);
  return img;
}

async function writeVolume(uri: string): Promise<void> {
  const commands = WRITES.flatMap(([o, n, b]) => ['-c', `write -P ${b} ${o} ${n}`]);
  await run('qemu-io', ['-f', 'raw', ...commands, uri]);
}

/** nbdinfo --map --json, as [offset, length, flags]. */
async function nbdinfoMap(uri: string): Promise<[number, number, number][]> {
  const out = JSON.parse(await run('nbdinfo', ['--map', '--json', uri])) as {
    offset: number;
    length: number;
    type: number;
  }[];
  return out.map((e) => [e.offset, e.length, e.type]);
}

describe('NBD block status with real clients', () => {
  const agent = new AgentProcess({ metrics: true });
  let work: string;
  let uri: string;
  let expected: string;

  /** Bytes the agent has read for NBD clients of `volume` so far. */
  async function bytesRead(volume: string): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();
    const m = new RegExp(
      `^lockstep_nbd_bytes_total\\{[^}]*volume="${volume}",op="read"[^}]*\\} (\\d+)$`,
      'm',
    ).exec(text);
    return m ? Number(m[1]) : 0;
  }

  beforeAll(async () => {
    work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-status-'));
    expected = path.join(work, 'expected.img');
    writeFileSync(expected, image());
    await agent.start();
    uri = await agent.createVolume('sparse', '64MiB');
    await writeVolume(uri);
  });
  afterAll(async () => {
    await agent.dispose();
    rmSync(work, { recursive: true, force: true });
  });

  it('nbdinfo --map lists the holes and the data exactly, and --totals sums them', async () => {
    expect(await nbdinfoMap(uri)).toEqual(MAP);
    const text = await run('nbdinfo', ['--map', uri]);
    expect(text).toContain(`${MiB}      131072    0  data`);
    const totals = (await run('nbdinfo', ['--map', '--totals', uri]))
      .trim()
      .split('\n')
      .map((line) => line.trim().split(/\s+/));
    expect(totals).toEqual(
      expect.arrayContaining([
        [String(DATA_BYTES), expect.stringMatching(/%$/), '0', 'data'],
        [String(SIZE - DATA_BYTES), expect.stringMatching(/%$/), '3', 'hole,zero'],
      ]),
    );
  });

  it('qemu-img map sees the same data and zero ranges', async () => {
    const map = JSON.parse(await run('qemu-img', ['map', '--output=json', '-f', 'raw', uri])) as {
      start: number;
      length: number;
      data: boolean;
      zero: boolean;
    }[];
    expect(map.map((e) => [e.start, e.length, e.data, e.zero])).toEqual(
      MAP.map(([o, n, f]) => [o, n, f === DATA, f !== DATA]),
    );
  });

  it('nbdcopy and qemu-img convert read only the data and produce identical images', async () => {
    const before = await bytesRead('sparse');
    const copied = path.join(work, 'nbdcopy.img');
    await run('nbdcopy', [uri, copied]);
    expect(readFileSync(copied).equals(image())).toBe(true);
    // Clients read whole blocks of their own size around the data, but nothing of the holes:
    // without block status they would read all 64 MiB.
    const afterCopy = await bytesRead('sparse');
    expect(afterCopy - before).toBeGreaterThanOrEqual(DATA_BYTES);
    expect(afterCopy - before).toBeLessThan(SIZE / 16);

    const qcow2 = path.join(work, 'converted.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow2]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', expected, qcow2]);
    const raw = path.join(work, 'converted.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, raw]);
    await run('cmp', [expected, raw]);
    const converted = (await bytesRead('sparse')) - afterCopy;
    expect(converted).toBeGreaterThanOrEqual(2 * DATA_BYTES);
    expect(converted).toBeLessThan(SIZE / 8);
  });

  it('nbdcopy into a fresh volume keeps its holes', async () => {
    const dest = await agent.createVolume('copy', '64MiB');
    await run('nbdcopy', [expected, dest]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, dest]);
    expect(await nbdinfoMap(dest)).toEqual(MAP);
  });

  it('lists base:allocation as the context of every export', async () => {
    const list = JSON.parse(
      await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${agent.nbdSocket}`]),
    ) as { structured: boolean; exports: { 'export-name': string; contexts: string[] }[] };
    expect(list.structured).toBe(true);
    for (const e of list.exports) expect(e.contexts).toEqual(['base:allocation']);
    const script = `import nbd, sys, json
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
out = {}
for queries in [[], ["base:"], ["base:allocation", "base:other"], ["lockstep:"], ["x-none:a"]]:
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    found = []
    h.opt_list_meta_context(lambda name: found.append(name) or 0)
    out[",".join(queries)] = found
h.opt_abort()
print(json.dumps(out))`;
    expect(JSON.parse(await run(systemPython, ['-c', script, uri]))).toEqual({
      '': ['base:allocation'],
      'base:': ['base:allocation'],
      'base:allocation,base:other': ['base:allocation'],
      'lockstep:': [],
      'x-none:a': [],
    });
  });

  it('answers libnbd block status: REQ_ONE, unaligned ranges, writes seen at once', async () => {
    const scratch = await agent.createVolume('live', '8MiB');
    const script = `import nbd, sys, json
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("lockstep:changed:no-such-snapshot")
h.connect_uri(sys.argv[1])
def status(length, offset, flags=0):
    got = []
    h.block_status(length, offset, lambda ctx, off, entries, err: got.append([ctx, off, entries]) or 0, flags)
    return got
out = {
    "selected": [h.can_meta_context("base:allocation"),
                 h.can_meta_context("lockstep:changed:no-such-snapshot")],
    "all": status(8 << 20, 0),
    "unaligned": status(100000, 12345),
}
h.pwrite(b"x" * 4096, 3 << 20)
out["after_write"] = status(8 << 20, 0)
out["req_one"] = status(8 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
out["req_one_inside"] = status(1000, (3 << 20) + 10, nbd.CMD_FLAG_REQ_ONE)
h.shutdown()
print(json.dumps(out))`;
    const out = JSON.parse(await run(systemPython, ['-c', script, scratch])) as Record<
      string,
      unknown
    >;
    const M = MiB;
    expect(out).toEqual({
      selected: [true, false],
      all: [['base:allocation', 0, [8 * M, HOLE_ZERO]]],
      unaligned: [['base:allocation', 12345, [100000, HOLE_ZERO]]],
      after_write: [
        ['base:allocation', 0, [3 * M, HOLE_ZERO, EXTENT, DATA, 5 * M - EXTENT, HOLE_ZERO]],
      ],
      req_one: [['base:allocation', 0, [3 * M, HOLE_ZERO]]],
      req_one_inside: [['base:allocation', 3 * M + 10, [1000, DATA]]],
    });
  });

  it('lists exactly the ranges written since a snapshot as lockstep:changed:<snapshot>', async () => {
    const changedUri = await agent.createVolume('changes', '64MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 8m', changedUri]);
    await agent.ctl('snapshot', 'create', 'changes', 'base');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x22 4k 8k', // inside written data
      '-c',
      'write -P 0x33 10m 1000', // part of one block, in a hole
      '-c',
      'write -P 0x44 20m 1m',
      changedUri,
    ]);
    const listed = (await run('nbdinfo', ['--list', changedUri.replace('/changes?', '/?')]))
      .split('\n')
      .map((l) => l.trim());
    expect(listed).toContain('lockstep:changed:base');
    const out = JSON.parse(
      await run('nbdinfo', ['--map=lockstep:changed:base', '--json', changedUri]),
    ) as { offset: number; length: number; type: number }[];
    const changed = out.filter((e) => e.type === 1).map((e) => [e.offset, e.length]);
    expect(changed).toEqual([
      [4 * KiB, 8 * KiB],
      [10 * MiB, 4 * KiB],
      [20 * MiB, MiB],
    ]);
    expect(out.reduce((sum, e) => sum + e.length, 0)).toBe(SIZE);
    // An unknown snapshot's context is not offered.
    await expect(run('nbdinfo', ['--map=lockstep:changed:nope', changedUri])).rejects.toThrow();
  });

  it('joins what several snapshots saved into one changed map: overlapping and touching runs merge', async () => {
    const changedUri = await agent.createVolume('layers', '64MiB');
    const qemuIo = (...cmds: string[]) =>
      run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), changedUri]);
    await agent.ctl('snapshot', 'create', 'layers', 'base');
    // Saved by base's log, the later run first.
    await qemuIo('write -P 0x11 1m 64k', 'write -P 0x12 0 4k');
    await agent.ctl('snapshot', 'create', 'layers', 'mid');
    // Saved by mid's log: a run touching base's, one overlapping both, and one apart.
    await qemuIo('write -P 0x21 1088k 64k', 'write -P 0x22 1056k 64k', 'write -P 0x23 8m 4k');
    const changed = async (snapshot: string) =>
      (
        JSON.parse(
          await run('nbdinfo', [`--map=lockstep:changed:${snapshot}`, '--json', changedUri]),
        ) as { offset: number; length: number; type: number }[]
      )
        .filter((e) => e.type === 1)
        .map((e) => [e.offset, e.length]);
    expect(await changed('base')).toEqual([
      [0, 4 * KiB],
      [MiB, 128 * KiB],
      [8 * MiB, 4 * KiB],
    ]);
    expect(await changed('mid')).toEqual([
      [MiB + 32 * KiB, 96 * KiB],
      [8 * MiB, 4 * KiB],
    ]);
  });

  it('reports everything as data once the allocation is unknown (after a crash)', async () => {
    await agent.kill('SIGKILL');
    await agent.start();
    expect(await nbdinfoMap(uri)).toEqual([[0, SIZE, DATA]]);
    const copied = path.join(work, 'after-crash.img');
    await run('nbdcopy', [uri, copied]);
    expect(readFileSync(copied).equals(image())).toBe(true);
  });
});

describe('NBD structured replies and metadata contexts on the wire', () => {
  const agent = new AgentProcess();
  const clients: RawNbd[] = [];
  const content = Buffer.alloc(MiB);
  content.fill(0x5a, 0, 64 * KiB);

  /** A fresh connection, past the greeting, with structured replies negotiated. */
  async function structured(): Promise<RawNbd> {
    const c = await RawNbd.connect(agent.nbdSocket);
    clients.push(c);
    await c.greet();
    c.sendOption(NBD.OPT_STRUCTURED_REPLY);
    expect((await c.readOptionReply()).type).toBe(NBD.REP_ACK);
    return c;
  }

  beforeAll(async () => {
    await agent.start();
    await agent.createVolume('wire', '1MiB');
    await agent.createVolume('other', '1MiB');
    await agent.ctl('volume', 'create', 'ro', '--size', '1MiB', '--read-only');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', agent.uri('wire')]);
  });
  afterEach(() => {
    for (const c of clients.splice(0)) c.destroy();
    expect(agent.proc.child.exitCode).toBeNull();
  });
  afterAll(() => agent.dispose());

  it('refuses STRUCTURED_REPLY with data, and metadata contexts before structured replies', async () => {
    const c = await RawNbd.connect(agent.nbdSocket);
    clients.push(c);
    await c.greet();
    c.sendOption(NBD.OPT_STRUCTURED_REPLY, Buffer.alloc(1));
    expect((await c.readOptionReply()).type).toBe(NBD.ERR_INVALID);
    for (const option of [NBD.OPT_SET_META_CONTEXT, NBD.OPT_LIST_META_CONTEXT]) {
      const r = await c.metaContext(option, 'wire', ['base:allocation']);
      expect(r).toMatchObject({ contexts: [], type: NBD.ERR_INVALID });
      expect(r.message).toMatch(/STRUCTURED_REPLY first/);
    }
    // Without structured replies, BLOCK_STATUS is answered EINVAL in a simple reply.
    expect((await c.go('wire')).type).toBe(NBD.REP_ACK);
    c.request(NBD.CMD_BLOCK_STATUS, 0, 4096, { cookie: 3 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 3 });
  });

  it('selects known contexts only, with ids, and answers BLOCK_STATUS with them', async () => {
    const c = await structured();
    const set = await c.metaContext(NBD.OPT_SET_META_CONTEXT, 'wire', [
      'lockstep:changed:nope',
      'base:allocation',
      'base:',
      'base:allocation',
    ]);
    expect(set.type).toBe(NBD.REP_ACK);
    expect(set.contexts).toHaveLength(1);
    const [{ id, name }] = set.contexts;
    expect(name).toBe('base:allocation');
    expect((await c.go('wire')).type).toBe(NBD.REP_ACK);

    c.request(NBD.CMD_BLOCK_STATUS, 0, MiB, { cookie: 11 });
    const chunk = await c.chunk();
    expect(chunk).toMatchObject({
      cookie: 11,
      type: NBD.REPLY_TYPE_BLOCK_STATUS,
      flags: NBD.REPLY_FLAG_DONE,
    });
    const p = chunk.payload;
    expect(p.length).toBe(4 + 16);
    expect(p.readUInt32BE(0)).toBe(id);
    expect([4, 8, 12, 16].map((at) => p.readUInt32BE(at))).toEqual([
      64 * KiB,
      DATA,
      MiB - 64 * KiB,
      HOLE_ZERO,
    ]);

    // REQ_ONE: exactly one extent, no longer than asked for.
    c.request(NBD.CMD_BLOCK_STATUS, 1000, 2000, { cookie: 12, flags: NBD.FLAG_REQ_ONE });
    const one = await c.chunk();
    expect(one.payload.length).toBe(12);
    expect([one.payload.readUInt32BE(4), one.payload.readUInt32BE(8)]).toEqual([2000, DATA]);

    // Past the end, empty, or with a flag BLOCK_STATUS does not take: EINVAL, as an error chunk.
    for (const [offset, length, flags] of [
      [MiB - 512, 1024, 0],
      [0, 0, 0],
      [0, 4096, NBD.FLAG_DF],
    ]) {
      c.request(NBD.CMD_BLOCK_STATUS, offset, length, { cookie: 13, flags });
      const err = await c.chunk();
      expect(err).toMatchObject({
        cookie: 13,
        type: NBD.REPLY_TYPE_ERROR,
        flags: NBD.REPLY_FLAG_DONE,
      });
      expect(err.payload.readUInt32BE(0)).toBe(NBD.EINVAL);
      expect(err.payload.toString('utf8', 6)).toMatch(/invalid request/);
    }
  });

  it('answers BLOCK_STATUS with EINVAL when the last SET selected nothing or another export', async () => {
    // A later SET replaces the selection, even one that selects nothing.
    const c = await structured();
    const first = await c.metaContext(NBD.OPT_SET_META_CONTEXT, 'wire', ['base:allocation']);
    expect(first.contexts).toHaveLength(1);
    const second = await c.metaContext(NBD.OPT_SET_META_CONTEXT, 'wire', ['x-unknown:thing']);
    expect(second).toMatchObject({ contexts: [], type: NBD.REP_ACK });
    expect((await c.go('wire')).type).toBe(NBD.REP_ACK);
    c.request(NBD.CMD_BLOCK_STATUS, 0, 4096, { cookie: 21 });
    const err = await c.chunk();
    expect(err.type).toBe(NBD.REPLY_TYPE_ERROR);
    expect(err.payload.readUInt32BE(0)).toBe(NBD.EINVAL);

    // Contexts selected for one export do not carry over to another.
    const d = await structured();
    await d.metaContext(NBD.OPT_SET_META_CONTEXT, 'other', ['base:allocation']);
    expect((await d.go('wire')).type).toBe(NBD.REP_ACK);
    d.request(NBD.CMD_BLOCK_STATUS, 0, 4096, { cookie: 22 });
    expect((await d.chunk()).payload.readUInt32BE(0)).toBe(NBD.EINVAL);
  });

  it('lists contexts with id 0, and refuses malformed requests and unknown exports', async () => {
    const c = await structured();
    const all = await c.metaContext(NBD.OPT_LIST_META_CONTEXT, 'wire', []);
    expect(all).toMatchObject({
      type: NBD.REP_ACK,
      contexts: [{ id: 0, name: 'base:allocation' }],
    });
    const bad = await c.metaContext(NBD.OPT_LIST_META_CONTEXT, 'wire', ['allocation']);
    expect(bad.type).toBe(NBD.ERR_INVALID);
    expect(bad.message).toMatch(/namespace/);
    const missing = await c.metaContext(NBD.OPT_SET_META_CONTEXT, 'nope', ['base:allocation']);
    expect(missing.type).toBe(NBD.ERR_UNKNOWN);
    // A query count beyond the data.
    const data = Buffer.alloc(4 + 4 + 4 + 4);
    data.writeUInt32BE(4, 0);
    data.write('wire', 4);
    data.writeUInt32BE(2, 8);
    data.writeUInt32BE(100, 12);
    c.sendOption(NBD.OPT_SET_META_CONTEXT, data);
    expect((await c.readOptionReply()).type).toBe(NBD.ERR_INVALID);
    // The connection carries on.
    expect((await c.go('wire')).type).toBe(NBD.REP_ACK);
  });

  it('answers reads with one data chunk, and errors with error chunks', async () => {
    const c = await structured();
    expect((await c.go('wire')).type).toBe(NBD.REP_ACK);
    c.request(NBD.CMD_READ, 60 * KiB, 8 * KiB, { cookie: 31 });
    const data = await c.chunk();
    expect(data).toMatchObject({
      cookie: 31,
      type: NBD.REPLY_TYPE_OFFSET_DATA,
      flags: NBD.REPLY_FLAG_DONE,
    });
    expect(Number(data.payload.readBigUInt64BE(0))).toBe(60 * KiB);
    expect(data.payload.subarray(8).equals(content.subarray(60 * KiB, 68 * KiB))).toBe(true);

    // Errors a simple reply would carry in its header come as error chunks here.
    c.request(NBD.CMD_READ, MiB - 100, 200, { cookie: 32 });
    const past = await c.chunk();
    expect(past).toMatchObject({ cookie: 32, type: NBD.REPLY_TYPE_ERROR, flags: 1 });
    expect(past.payload.readUInt32BE(0)).toBe(NBD.EINVAL);
    const length = past.payload.readUInt16BE(4);
    expect(past.payload.length).toBe(6 + length);
    expect(past.payload.toString('utf8', 6)).toMatch(/offset or length/);
    c.request(NBD.CMD_READ, 0, 64 * MiB, { cookie: 33 });
    expect((await c.chunk()).payload.readUInt32BE(0)).toBe(NBD.EINVAL);

    // Successful writes and flushes keep the simple reply, which the spec allows.
    c.request(NBD.CMD_WRITE, 128 * KiB, 4096, { cookie: 34, payload: Buffer.alloc(4096, 0x11) });
    expect(await c.reply()).toMatchObject({ error: 0, cookie: 34 });
    c.request(NBD.CMD_FLUSH, 0, 0, { cookie: 35 });
    expect(await c.reply()).toMatchObject({ error: 0, cookie: 35 });
    c.request(NBD.CMD_READ, 128 * KiB, 4096, { cookie: 36 });
    expect((await c.chunk()).payload.subarray(8).equals(Buffer.alloc(4096, 0x11))).toBe(true);
    c.request(NBD.CMD_DISC, 0, 0);
    expect(await c.closedByServer()).toBe(true);
  });

  it('sends a write refused on a read-only export as an error chunk', async () => {
    const c = await structured();
    expect((await c.go('ro')).type).toBe(NBD.REP_ACK);
    c.request(NBD.CMD_WRITE, 0, 4096, { cookie: 41, payload: Buffer.alloc(4096, 0xee) });
    const err = await c.chunk();
    expect(err).toMatchObject({ cookie: 41, type: NBD.REPLY_TYPE_ERROR, flags: 1 });
    expect(err.payload.readUInt32BE(0)).toBe(NBD.EPERM);
    expect(err.payload.toString('utf8', 6)).toMatch(/read-only/);
  });

  it('keeps simple replies for a client that never negotiates, byte for byte', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'wire');
    clients.push(c);
    c.request(NBD.CMD_READ, 0, 4096, { cookie: 51 });
    const r = await c.reply(4096);
    expect(r).toMatchObject({ error: 0, cookie: 51 });
    expect(r.data.equals(content.subarray(0, 4096))).toBe(true);
    c.request(NBD.CMD_READ, MiB, 1, { cookie: 52 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 52 });
    // Nothing but the next reply follows an error: no data, no chunk.
    c.request(NBD.CMD_FLUSH, 0, 0, { cookie: 53 });
    expect(await c.reply()).toMatchObject({ error: 0, cookie: 53 });
  });
});
