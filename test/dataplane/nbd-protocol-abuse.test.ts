// What real clients never send: each case gets the spec's error reply or a clean close of that
// connection only, the agent keeps serving everyone else, and no byte changes outside valid writes.
import { AgentProcess, run } from '../harness/agent-process';
import { NBD, RawNbd } from '../harness/raw-nbd';

const SIZE = 8 * 1024 * 1024;

describe('NBD protocol abuse', () => {
  const agent = new AgentProcess();
  let uri: string;

  beforeAll(async () => {
    await agent.start();
    uri = await agent.createVolume('victim', '8MiB');
    await agent.ctl('volume', 'create', 'readonly', '--size', '1MiB', '--read-only');
    // Known contents everywhere, so any stray write would show.
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x3c 0 ${SIZE}`, uri]);
  });

  afterEach(async () => {
    // After every case: the agent is alive, serves a fresh client, and the data is intact.
    expect(agent.proc.child.exitCode).toBeNull();
    const out = await run('qemu-io', ['-f', 'raw', '-c', `read -P 0x3c 0 ${SIZE}`, uri]);
    expect(out).not.toContain('verification failed');
  });
  afterAll(() => agent.dispose());

  it('closes a connection whose client flags lack FIXED_NEWSTYLE', async () => {
    const c = await RawNbd.connect(agent.nbdSocket);
    await c.greet(0);
    expect(await c.closedByServer()).toBe(true);
  });

  it('closes a connection with a bad option magic', async () => {
    const c = await RawNbd.connect(agent.nbdSocket);
    await c.greet();
    c.sendOption(NBD.OPT_LIST, Buffer.alloc(0), 0x1122334455667788n);
    expect(await c.closedByServer()).toBe(true);
  });

  it('answers an unknown option with ERR_UNSUP and an unknown export with ERR_UNKNOWN, and carries on', async () => {
    const c = await RawNbd.connect(agent.nbdSocket);
    await c.greet();
    c.sendOption(4242);
    expect((await c.readOptionReply()).type).toBe(NBD.ERR_UNSUP);
    const missing = await c.go('no-such-volume');
    expect(missing.type).toBe(NBD.ERR_UNKNOWN);
    expect(missing.message).toContain('no-such-volume');
    expect((await c.go('victim')).type).toBe(1);
    c.request(NBD.CMD_READ, 0, 4096);
    const r = await c.reply(4096);
    expect(r.error).toBe(0);
    expect(r.data.every((b) => b === 0x3c)).toBe(true);
    c.destroy();
  });

  it('closes a connection with a bad request magic', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    c.request(NBD.CMD_READ, 0, 4096, { magic: 0xdeadbeef });
    expect(await c.closedByServer()).toBe(true);
  });

  it('survives a truncated request header followed by a hang-up', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
    c.write(h.subarray(0, 11));
    c.destroy();
  });

  it('closes a connection announcing a write larger than the maximum payload', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    c.request(NBD.CMD_WRITE, 0, 0xffffffff, { payload: Buffer.alloc(4096, 0xee) });
    expect(await c.closedByServer()).toBe(true);
  });

  it('answers EINVAL to an unknown command, unknown flags and an oversized read, and carries on', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    c.request(99, 0, 4096, { cookie: 7 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 7 });
    c.request(NBD.CMD_READ, 0, 4096, { cookie: 8, flags: 0x8000 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 8 });
    c.request(NBD.CMD_READ, 0, 64 * 1024 * 1024, { cookie: 9 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 9 });
    c.request(NBD.CMD_READ, 4096, 512, { cookie: 10 });
    expect(await c.reply(512)).toMatchObject({ error: 0, cookie: 10 });
    c.destroy();
  });

  it('answers ENOSPC to a write past the end and EINVAL to a read past the end, changing nothing', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    // Straddles the end: its in-range part must not be written either.
    c.request(NBD.CMD_WRITE, SIZE - 4096, 8192, { cookie: 1, payload: Buffer.alloc(8192, 0xee) });
    expect(await c.reply()).toMatchObject({ error: NBD.ENOSPC, cookie: 1 });
    c.request(NBD.CMD_WRITE, 2 ** 60, 4096, { cookie: 2, payload: Buffer.alloc(4096, 0xee) });
    expect(await c.reply()).toMatchObject({ error: NBD.ENOSPC, cookie: 2 });
    c.request(NBD.CMD_READ, SIZE, 1, { cookie: 3 });
    expect(await c.reply()).toMatchObject({ error: NBD.EINVAL, cookie: 3 });
    c.request(NBD.CMD_FLUSH, 0, 0, { cookie: 4 });
    expect(await c.reply()).toMatchObject({ error: 0, cookie: 4 });
    c.request(NBD.CMD_DISC, 0, 0);
    expect(await c.closedByServer()).toBe(true);
  });

  it('drops a client that vanishes in the middle of a write payload without writing any of it', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'victim');
    c.request(NBD.CMD_WRITE, 0, 1024 * 1024, { payload: Buffer.alloc(512 * 1024, 0xee) });
    await new Promise((r) => setTimeout(r, 100));
    c.destroy();
  });

  it('answers EPERM to writes on a read-only export and still serves reads', async () => {
    const c = await RawNbd.open(agent.nbdSocket, 'readonly');
    c.request(NBD.CMD_WRITE, 0, 4096, { cookie: 5, payload: Buffer.alloc(4096, 0xee) });
    expect(await c.reply()).toMatchObject({ error: NBD.EPERM, cookie: 5 });
    c.request(NBD.CMD_READ, 0, 4096, { cookie: 6 });
    const r = await c.reply(4096);
    expect(r).toMatchObject({ error: 0, cookie: 6 });
    expect(r.data.every((b) => b === 0)).toBe(true);
    c.destroy();
    await expect(
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', agent.uri('readonly')]),
    ).rejects.toThrow();
  });

  it('keeps serving other clients while one connection is abused', async () => {
    const abusers = await Promise.all(
      Array.from({ length: 8 }, () => RawNbd.open(agent.nbdSocket, 'victim')),
    );
    for (const a of abusers) a.request(NBD.CMD_READ, 0, 4096, { magic: 1 });
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3c 0 1m', uri]);
    expect(out).not.toContain('verification failed');
    for (const a of abusers) expect(await a.closedByServer()).toBe(true);
  });
});
