// lib/nbd-client.ts against the real agent (and qemu-io as a second opinion on what landed on
// the volume), plus a scripted server that answers out of order in tiny fragments, which the
// agent never does on purpose.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { LockstepError, isLockstepError } from '../../lib/errors';
import { NbdClient, NbdRequestError } from '../../lib/nbd-client';
import { AgentProcess, run } from '../harness/agent-process';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('NbdClient against the agent', () => {
  const agent = new AgentProcess();
  const opened: NbdClient[] = [];
  const open = async (name: string): Promise<NbdClient> => {
    const c = await NbdClient.connect({ socketPath: agent.nbdSocket }, name, { timeoutMs: 30_000 });
    opened.push(c);
    return c;
  };

  beforeAll(async () => {
    await agent.start();
    await agent.createVolume('v', '16MiB');
    await agent.ctl('volume', 'create', 'ro', '--size', '1MiB', '--read-only');
  });
  afterEach(async () => {
    await Promise.all(opened.splice(0).map((c) => c.close()));
  });
  afterAll(async () => {
    await agent.dispose();
  });

  it('learns size and flags from the handshake', async () => {
    const v = await open('v');
    expect(v.size).toBe(16 * MiB);
    expect(v.readOnly).toBe(false);
    expect(v.canFlush).toBe(true);
    expect(v.blockSize.maximum).toBe(32 * MiB);
    const ro = await open('ro');
    expect(ro.size).toBe(1 * MiB);
    expect(ro.readOnly).toBe(true);
  });

  it('pipelines 200 writes of distinct data and reads every one back', async () => {
    const c = await open('v');
    // Unaligned offsets and odd lengths, one 8 KiB slot each, so no two writes overlap.
    const slots = Array.from({ length: 200 }, (_, i) => ({
      offset: i * 8 * KiB + (i % 7),
      data: randomBytes(4 * KiB + i),
    }));
    const writes = slots.map((s) => c.write(s.offset, s.data));
    expect(c.inFlight).toBe(200);
    await Promise.all(writes);
    expect(c.inFlight).toBe(0);

    const got = await Promise.all(slots.map((s) => c.read(s.offset, s.data.length)));
    const wrong = slots.flatMap((s, i) => (got[i].equals(s.data) ? [] : [i]));
    expect(wrong).toEqual([]);

    // One reply far larger than a socket read, so its data arrives in many pieces.
    const whole = await c.read(0, 200 * 8 * KiB);
    const wrongInWhole = slots.flatMap((s, i) =>
      whole.subarray(s.offset, s.offset + s.data.length).equals(s.data) ? [] : [i],
    );
    expect(wrongInWhole).toEqual([]);
  });

  it('flushes, and writes with FUA', async () => {
    const c = await open('v');
    const data = Buffer.alloc(64 * KiB, 0x3c);
    await c.write(15 * MiB, data, { fua: true });
    await expect(c.flush()).resolves.toBeUndefined();
    expect((await c.read(15 * MiB, data.length)).equals(data)).toBe(true);
  });

  it('writes data that qemu-io reads back, and reads what qemu-io wrote', async () => {
    const uri = await agent.createVolume('q', '1MiB');
    const c = await open('q');
    await c.write(0, Buffer.alloc(64 * KiB, 0x5a));
    await c.close();
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 64k', uri]);
    expect(out).not.toContain('verification failed');
    // The check above is only worth something if a wrong pattern is caught.
    await expect(run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5b 0 64k', uri])).rejects.toThrow(
      /verification failed/,
    );

    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xc3 64k 64k', uri]);
    const again = await open('q');
    expect((await again.read(64 * KiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0xc3))).toBe(true);
  });

  it('rejects a write to a read-only volume with EPERM and stays usable', async () => {
    const c = await open('ro');
    const err: unknown = await c.write(0, Buffer.alloc(512, 1)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
    expect(err).toMatchObject({ errno: 1, code: 'EPERM' });
    expect((await c.read(0, 512)).equals(Buffer.alloc(512))).toBe(true);
  });

  it('rejects I/O past the end with ENOSPC (write) and EINVAL (read)', async () => {
    const c = await open('v');
    await expect(c.write(c.size - 100, Buffer.alloc(4 * KiB))).rejects.toMatchObject({
      errno: 28,
      message: expect.stringContaining('ENOSPC') as unknown,
    });
    await expect(c.read(c.size, 1)).rejects.toMatchObject({ errno: 22 });
    await expect(c.read(c.size - 1, 1)).resolves.toHaveLength(1);
  });

  it('refuses an unknown export with LOCKSTEP_ERR_VOLUME_NOT_FOUND', async () => {
    const err: unknown = await NbdClient.connect({ socketPath: agent.nbdSocket }, 'nope').catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(LockstepError);
    expect(err).toMatchObject({ code: 'LOCKSTEP_ERR_VOLUME_NOT_FOUND' });
    expect((err as Error).message).toContain('nope');
  });

  it('fails to connect to a socket nobody listens on with LOCKSTEP_ERR_UNAVAILABLE', async () => {
    const missing = path.join(agent.dataDir, 'missing.sock');
    await expect(NbdClient.connect({ socketPath: missing }, 'v')).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_UNAVAILABLE',
    });
  });

  it('close() lets requests in flight finish, then refuses new ones', async () => {
    const c = await open('v');
    const data = randomBytes(256 * KiB);
    const writes = Array.from({ length: 20 }, (_, i) => c.write(i * data.length, data));
    const closed = c.close();
    await expect(c.read(0, 1)).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_UNAVAILABLE' });
    await expect(Promise.all(writes)).resolves.toHaveLength(20);
    await closed;
    await expect(c.flush()).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_UNAVAILABLE' });

    const check = await open('v');
    expect((await check.read(19 * data.length, data.length)).equals(data)).toBe(true);
    expect(agent.proc.log()).not.toContain('protocol error');
  });
});

describe('NbdClient when the agent stops answering or dies', () => {
  // Plaintext TCP on purpose: this client speaks no STARTTLS (the NBD export's TLS is tested
  // with qemu and libnbd in security.test.ts).
  const agent = new AgentProcess({ nbdTcp: true, insecure: true });
  beforeAll(async () => {
    await agent.start();
    await agent.createVolume('k', '16MiB');
  });
  afterAll(async () => {
    await agent.dispose();
  });

  it('times out, then rejects pending and later requests once the agent is killed', async () => {
    const target = { host: '127.0.0.1', port: agent.nbdTcpPort };
    const a = await NbdClient.connect(target, 'k');
    const b = await NbdClient.connect(target, 'k', { timeoutMs: 500 });
    await a.write(0, Buffer.alloc(4 * KiB, 7));

    agent.proc.child.kill('SIGSTOP');
    const started = Date.now();
    await expect(b.read(0, 4 * KiB)).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_UNAVAILABLE',
      message: expect.stringMatching(/no reply within 500 ms/) as unknown,
    });
    expect(Date.now() - started).toBeLessThan(5000);
    await expect(b.flush()).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_UNAVAILABLE' });

    const pending = [
      ...Array.from({ length: 20 }, (_, i) => a.write(i * 4 * KiB, Buffer.alloc(4 * KiB, i))),
      a.read(0, 4 * KiB).then(() => undefined),
      a.flush(),
    ];
    const outcomes = pending.map((p) =>
      p.then(
        () => 'resolved',
        (e: unknown) => e,
      ),
    );
    // b's timeout has come and gone; a has no timeout, so its requests just wait.
    expect(a.inFlight).toBe(22);

    await agent.kill('SIGKILL');
    const results = await Promise.all(outcomes);
    expect(results.filter((r) => !isLockstepError(r, 'LOCKSTEP_ERR_UNAVAILABLE'))).toEqual([]);
    await expect(a.read(0, 1)).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_UNAVAILABLE' });
    await expect(a.write(0, Buffer.alloc(1))).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_UNAVAILABLE',
    });
    await expect(Promise.all([a.close(), b.close()])).resolves.toHaveLength(2);
  });
});

// ---- a scripted server ---------------------------------------------------------------------

/** Sends `buf` in irregular pieces with a pause between, so the client sees split messages. */
async function dribble(sock: net.Socket, buf: Buffer): Promise<void> {
  const pieces = [1, 3, 5, 16, 7, 300, 2, 1000, 11];
  for (let off = 0, i = 0; off < buf.length; i++) {
    const n = pieces[i % pieces.length];
    sock.write(buf.subarray(off, off + n));
    off += n;
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Reads exactly what is asked for from a socket, in order. */
class Reader {
  private buffered = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  constructor(sock: net.Socket) {
    sock.on('data', (c: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, c]);
      this.wake?.();
    });
  }
  async take(n: number): Promise<Buffer> {
    while (this.buffered.length < n) await new Promise<void>((r) => (this.wake = r));
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }
}

const FAKE_SIZE = 1 * MiB;
const FAKE_READS = 8;
const FAKE_READ_BYTES = 1000;
const FAKE_EIO_OFFSET = 3 * FAKE_READ_BYTES;

function fakePattern(offset: number, length: number): Buffer {
  return Buffer.from(Array.from({ length }, (_, i) => ((offset + i) * 31 + 7) & 0xff));
}

function optionReply(type: number, data: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x3e889045565a9n, 0);
  h.writeUInt32BE(7, 8); // NBD_OPT_GO
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

/** Negotiates, waits for FAKE_READS read requests, then answers them last-first. */
async function serveFake(sock: net.Socket, seen: { cookies: bigint[] }): Promise<void> {
  const r = new Reader(sock);
  const greeting = Buffer.alloc(18);
  greeting.write('NBDMAGICIHAVEOPT', 0, 'latin1');
  greeting.writeUInt16BE(3, 16);
  await dribble(sock, greeting);
  await r.take(4);
  const option = await r.take(16);
  await r.take(option.readUInt32BE(12));
  const info = Buffer.alloc(12);
  info.writeUInt16BE(0, 0); // NBD_INFO_EXPORT
  info.writeBigUInt64BE(BigInt(FAKE_SIZE), 2);
  info.writeUInt16BE(1 | 4, 10); // HAS_FLAGS | SEND_FLUSH
  await dribble(sock, Buffer.concat([optionReply(3, info), optionReply(1, Buffer.alloc(0))]));

  const requests: Buffer[] = [];
  for (let i = 0; i < FAKE_READS; i++) requests.push(Buffer.from(await r.take(28)));
  const replies: Buffer[] = [];
  for (const req of requests.reverse()) {
    if (req.readUInt32BE(0) !== 0x25609513 || req.readUInt16BE(6) !== 0) {
      throw new Error('scripted server expected a READ');
    }
    seen.cookies.push(req.readBigUInt64BE(8));
    const offset = Number(req.readBigUInt64BE(16));
    const length = req.readUInt32BE(24);
    const h = Buffer.alloc(16);
    h.writeUInt32BE(0x67446698, 0);
    h.writeUInt32BE(offset === FAKE_EIO_OFFSET ? 5 : 0, 4);
    req.copy(h, 8, 8, 16);
    replies.push(offset === FAKE_EIO_OFFSET ? h : Buffer.concat([h, fakePattern(offset, length)]));
  }
  await dribble(sock, Buffer.concat(replies));
}

describe('NbdClient reply parsing', () => {
  let dir: string;
  let server: net.Server;
  const sockets: net.Socket[] = [];
  const seen = { cookies: [] as bigint[] };
  const serverErrors: unknown[] = [];
  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-nbd-client-'));
    server = net.createServer((sock) => {
      sockets.push(sock);
      sock.on('error', () => {});
      serveFake(sock, seen).catch((err: unknown) => serverErrors.push(err));
    });
    await new Promise<void>((resolve) => server.listen(path.join(dir, 'fake.sock'), resolve));
  });
  afterAll(async () => {
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
    rmSync(dir, { recursive: true, force: true });
  });

  it('matches fragmented, out-of-order replies to their requests by cookie', async () => {
    const c = await NbdClient.connect({ socketPath: path.join(dir, 'fake.sock') }, 'fake', {
      timeoutMs: 10_000,
    });
    expect(c.size).toBe(FAKE_SIZE);
    expect(c.canFlush).toBe(true);
    expect(c.readOnly).toBe(false);

    const offsets = Array.from({ length: FAKE_READS }, (_, i) => i * FAKE_READ_BYTES);
    const outcomes = await Promise.all(
      offsets.map((o) =>
        c.read(o, FAKE_READ_BYTES).then(
          (data) => data,
          (e: unknown) => e,
        ),
      ),
    );
    expect(serverErrors).toEqual([]);
    expect(new Set(seen.cookies).size).toBe(FAKE_READS);
    offsets.forEach((o, i) => {
      if (o === FAKE_EIO_OFFSET) {
        expect(outcomes[i]).toMatchObject({ errno: 5, code: 'EIO' });
      } else {
        expect(outcomes[i]).toEqual(fakePattern(o, FAKE_READ_BYTES));
      }
    });
    await c.close();
  });
});
