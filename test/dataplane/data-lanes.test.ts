// The replica's data port facing bad input: raw sockets that send a bad hello, a wrong or stale
// token, an oversized write, or vanish mid-write. Each must close that connection only, with
// the reason logged (and told to the sender when it is a hello), apply nothing half-received,
// and leave a real primary's replication of another volume untouched.
import tls from 'node:tls';
import { channelCredentials, channelOptions, serverCheck } from '../../lib/tls/transport';
import { transportAs } from '../harness/test-certificates';
import { randomUUID } from 'node:crypto';
import { openSync, readSync, closeSync, readFileSync } from 'node:fs';
import type net from 'node:net';
import { replicationProto } from '../../proto';
import type { HandshakeResponse__Output } from '../../proto/gen/lockstep/v1/HandshakeResponse';
import {
  ACK_BYTES,
  HELLO_BYTES,
  OP_HEADER_BYTES,
  OpKind,
  REPLY_BYTES,
  encodeHello,
  writeOpHeader,
} from '../../sidecar/src/replication/frames';
import type { AgentProcess } from '../harness/agent-process';
import { run } from '../harness/agent-process';
import { freePort, waitFor } from '../harness/processes';
import {
  dataFile,
  metaFile,
  expectIdentical,
  inSync,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

/** A raw connection to the data port that records what came back and how it ended. */
class RawLane {
  received = Buffer.alloc(0);
  closed = false;
  private readonly closedP: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.received = Buffer.concat([this.received, c]);
    });
    socket.on('error', () => {});
    this.closedP = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        resolve();
      }),
    );
  }

  /** A TLS connection with the agent certificate of node raw-test (the primary these tests play): bad frames from a peer that got in. */
  static async connect(address: string): Promise<RawLane> {
    const [host, port] = address.split(':');
    const t = await transportAs({ role: 'agent', name: 'raw-test' });
    if (!t.secure) throw new Error('expected TLS');
    const socket = tls.connect({
      host,
      port: Number(port),
      secureContext: t.dir.secureContext,
      checkServerIdentity: serverCheck(['agent']),
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', resolve);
      socket.once('error', reject);
    });
    return new RawLane(socket);
  }

  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.received.length < n && !this.closed && Date.now() < deadline) await sleep(5);
    return this.received;
  }

  /** The hello's answer: status and message. */
  async reply(): Promise<{ status: number; message: string }> {
    const got = await this.read(REPLY_BYTES);
    if (got.length < REPLY_BYTES) throw new Error(`no reply (got ${got.length} bytes)`);
    const length = got.readUInt32BE(8);
    const all = await this.read(REPLY_BYTES + length);
    return {
      status: got.readUInt16BE(6),
      message: all.toString('utf8', REPLY_BYTES, REPLY_BYTES + length),
    };
  }

  waitClosed(timeoutMs = 5000): Promise<boolean> {
    return Promise.race([this.closedP.then(() => true), sleep(timeoutMs).then(() => false)]);
  }
}

function op(
  kind: OpKind,
  seq: number,
  offset: number,
  length: number,
  data?: Buffer,
  epoch = 0,
): Buffer {
  const h = Buffer.alloc(OP_HEADER_BYTES);
  writeOpHeader(h, 0, kind, 0, length, seq, offset, epoch);
  return data ? Buffer.concat([h, data]) : h;
}

describe('replication data lanes, facing bad input', () => {
  let a: AgentProcess;
  let b: AgentProcess;
  let uri: string;
  let dataAddress: string;
  let rpc: InstanceType<ReturnType<typeof replicationProto>['Replication']>;
  const lanes: RawLane[] = [];

  beforeAll(async () => {
    const dataPort = await freePort();
    dataAddress = `127.0.0.1:${dataPort}`;
    b = await replicationAgent('node-b', ['--data-listen', dataAddress]).start();
    a = await replicationAgent('node-a').start();
    uri = await a.createVolume('v', '16MiB');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    const asRawTest = await transportAs({ role: 'agent', name: 'raw-test' });
    rpc = new (replicationProto().Replication)(
      b.grpcAddress,
      channelCredentials(asRawTest, ['agent']),
      channelOptions(asRawTest),
    );
  });

  afterEach(async () => {
    for (const l of lanes.splice(0)) l.socket.destroy();
    // Whatever a test threw at the data port, the real primary's replication carries on.
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `write -P ${Math.floor(Math.random() * 250)} 0 1m`,
      uri,
    ]);
    await waitPeer(a, 'v', b, inSync, 'still in sync');
    await expectIdentical(a, b, 'v');
  });

  afterAll(async () => {
    rpc?.close();
    await a?.dispose();
    await b?.dispose();
  });

  /** Handshakes as a primary of volume `w` (created on first contact). */
  const uuid = randomUUID();
  function handshake(
    primaryAddress = '127.0.0.1:1',
    volume = 'w',
    epoch = 0,
  ): Promise<HandshakeResponse__Output> {
    return new Promise((resolve, reject) =>
      rpc.Handshake(
        {
          volume,
          uuid,
          epoch,
          sizeBytes: 16 * MiB,
          regionSize: 65536,
          createIfMissing: true,
          primaryNode: 'raw-test',
          primaryAddress,
          generation: { current: uuid, history: [] },
          mode: 'sync',
        },
        { deadline: Date.now() + 5000 },
        (err, res) => (err ? reject(err) : resolve(res!)),
      ),
    );
  }

  async function lane(): Promise<RawLane> {
    const l = await RawLane.connect(dataAddress);
    lanes.push(l);
    return l;
  }

  async function acceptedLane(token: string, index = 0, volume = 'w', epoch = 0): Promise<RawLane> {
    const l = await lane();
    l.socket.write(encodeHello({ lane: index, keepaliveMs: 1000, token, epoch, volume }));
    expect(await l.reply()).toEqual({ status: 0, message: '' });
    l.received = l.received.subarray(REPLY_BYTES);
    return l;
  }

  const agentLog = () => readFileSync(b.proc.logPath, 'utf8');
  /** The agent's log reaches its file a little after the socket events a test sees. */
  const logShows = (pattern: RegExp) =>
    waitFor(
      `${pattern} in the agent's log`,
      () => Promise.resolve(pattern.test(agentLog()) || undefined),
      5000,
    );

  function readW(offset: number, length: number): Buffer {
    const fd = openSync(dataFile(b, 'w'), 'r');
    try {
      const out = Buffer.alloc(length);
      readSync(fd, out, 0, length, offset);
      return out;
    } finally {
      closeSync(fd);
    }
  }

  it('advertises the data port in the handshake', async () => {
    const hello = await handshake();
    expect(hello.dataAddress).toBe(dataAddress);
    expect(hello.session).toMatch(/^[0-9a-f]{32}$/);
  });

  it('answers a hello with a bad magic with the reason, then closes that connection', async () => {
    const l = await lane();
    l.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: lockstep\r\nAccept: */*\r\n\r\n'));
    const r = await l.reply();
    expect(r.status).not.toBe(0);
    expect(r.message).toMatch(/bad hello: bad hello magic 0x47455420/);
    expect(await l.waitClosed()).toBe(true);
    await logShows(/data lane refused.*bad hello magic|bad hello magic.*data lane refused/);
  });

  it('refuses an unsupported version and an out-of-range name length', async () => {
    const hello = encodeHello({
      lane: 0,
      keepaliveMs: 1000,
      token: '0'.repeat(32),
      epoch: 0,
      volume: 'w',
    });
    const v9 = Buffer.from(hello);
    v9.writeUInt16BE(9, 4);
    const l1 = await lane();
    l1.socket.write(v9);
    expect((await l1.reply()).message).toMatch(/unsupported protocol version 9/);
    const noName = Buffer.from(hello.subarray(0, HELLO_BYTES));
    noName.writeUInt16BE(0, 12);
    const l2 = await lane();
    l2.socket.write(noName);
    expect((await l2.reply()).message).toMatch(/bad volume name length 0/);
    expect(await l1.waitClosed()).toBe(true);
    expect(await l2.waitClosed()).toBe(true);
  });

  it('refuses unknown volumes, unknown and stale tokens, and a lane index already in use', async () => {
    const first = await handshake();
    const second = await handshake(); // replaces the first session
    const tries: [string, string, RegExp][] = [
      ['nope', second.session, /volume "nope" does not exist/],
      ['w', 'f'.repeat(32), /stale or unknown session token/],
      ['w', first.session, /stale or unknown session token/],
    ];
    for (const [volume, token, why] of tries) {
      const l = await lane();
      l.socket.write(encodeHello({ lane: 0, keepaliveMs: 1000, token, epoch: 0, volume }));
      const r = await l.reply();
      expect(r.status).not.toBe(0);
      expect(r.message).toMatch(why);
      expect(await l.waitClosed()).toBe(true);
    }
    await acceptedLane(second.session, 0);
    const dup = await lane();
    dup.socket.write(
      encodeHello({ lane: 0, keepaliveMs: 1000, token: second.session, epoch: 0, volume: 'w' }),
    );
    expect((await dup.reply()).message).toMatch(/lane 0 .* already connected/);
    // A second primary may not take over a session whose lanes are alive.
    await expect(handshake('127.0.0.1:2')).rejects.toThrow(/second primary/);
  });

  it('refuses a handshake, a hello and an op from an older epoch, and says so (fencing tokens)', async () => {
    const current = await handshake('127.0.0.1:3', 'x', 5);
    expect(current.epoch).toBe(5);
    // A primary from before epoch 5 (replaced while it was cut off) is refused at the door.
    await expect(handshake('127.0.0.1:4', 'x', 4)).rejects.toThrow(
      /has seen epoch 5; 127\.0\.0\.1:4 writes in epoch 4: it was replaced/,
    );
    const stale = await lane();
    stale.socket.write(
      encodeHello({ lane: 1, keepaliveMs: 1000, token: current.session, epoch: 4, volume: 'x' }),
    );
    expect((await stale.reply()).message).toMatch(/epoch 4 is older than this copy's 5/);
    // An op that carries an older epoch is not applied: ESTALE, and the lane closes.
    const l = await acceptedLane(current.session, 0, 'x', 5);
    const data = Buffer.alloc(4096, 0x5a);
    l.socket.write(
      Buffer.concat([
        op(OpKind.WRITE, 1, 0, 4096, data, 5),
        op(OpKind.WRITE, 2, 8192, 4096, data, 4),
      ]),
    );
    const acks = await l.read(2 * ACK_BYTES);
    expect(acks.length).toBe(2 * ACK_BYTES);
    // Acks come as ops finish: the refusal before the write it followed.
    const errnoBySeq = new Map(
      [0, ACK_BYTES].map((at) => [acks.readUInt32BE(at + 12), acks.readUInt32BE(at + 4)]),
    );
    expect(errnoBySeq).toEqual(
      new Map([
        [1, 0],
        [2, 116],
      ]),
    );
    expect(await l.waitClosed()).toBe(true);
    await logShows(/op from an older epoch refused/);
    const fd = openSync(dataFile(b, 'x'), 'r');
    try {
      const got = Buffer.alloc(12288);
      readSync(fd, got, 0, got.length, 0);
      expect(got.subarray(0, 4096).equals(data)).toBe(true);
      expect(got.subarray(8192).equals(Buffer.alloc(4096))).toBe(true);
    } finally {
      closeSync(fd);
    }
    // The epoch is durable: the copy's metadata says 5.
    expect((JSON.parse(readFileSync(metaFile(b, 'x'), 'utf8')) as { epoch?: number }).epoch).toBe(
      5,
    );
  });

  it('closes a lane that announces an oversized write, having applied and acknowledged what came before', async () => {
    const { session } = await handshake();
    const l = await acceptedLane(session);
    const data = Buffer.alloc(4096, 0x3c);
    const huge = op(OpKind.WRITE, 2, 0, 64 * MiB);
    l.socket.write(Buffer.concat([op(OpKind.WRITE, 1, 4096, 4096, data), huge]));
    const acks = await l.read(ACK_BYTES);
    expect(acks.length).toBeGreaterThanOrEqual(ACK_BYTES);
    expect(acks.readUInt32BE(4)).toBe(0); // errno
    expect(acks.readUInt32BE(12)).toBe(1); // seq
    expect(await l.waitClosed()).toBe(true);
    expect(readW(4096, 4096).equals(data)).toBe(true);
    await logShows(/malformed replication stream/);
    expect(agentLog()).toMatch(/exceeds the 4194304-byte cap/);
  });

  it('closes a lane with an unknown op kind', async () => {
    const { session } = await handshake();
    const l = await acceptedLane(session);
    const bad = op(OpKind.PING, 1, 0, 0);
    bad[0] = 0x7f;
    l.socket.write(bad);
    expect(await l.waitClosed()).toBe(true);
    await logShows(/unknown op kind 127/);
  });

  it('applies nothing of a write whose sender vanished mid-payload, and takes the next lane', async () => {
    const { session } = await handshake();
    const l = await acceptedLane(session);
    const partial = op(OpKind.WRITE, 1, MiB, 65536, Buffer.alloc(10_000, 0x77));
    // Header split across two segments, as a slow network would deliver it.
    l.socket.write(partial.subarray(0, 10));
    await sleep(50);
    l.socket.write(partial.subarray(10));
    await sleep(100);
    l.socket.destroy();
    await sleep(200);
    expect(readW(MiB, 65536).equals(Buffer.alloc(65536))).toBe(true);

    const again = await handshake();
    const next = await acceptedLane(again.session);
    next.socket.write(op(OpKind.PING, 7, 0, 0));
    const ack = await next.read(ACK_BYTES);
    expect(ack.readUInt32BE(12)).toBe(7);
  });

  it('drops a lane that goes silent past its keepalive, freeing the volume for another primary', async () => {
    const { session } = await handshake();
    const l = await lane();
    l.socket.write(
      encodeHello({ lane: 0, keepaliveMs: 100, token: session, epoch: 0, volume: 'w' }),
    );
    expect((await l.reply()).status).toBe(0);
    await expect(handshake('127.0.0.1:2')).rejects.toThrow(/second primary/);
    // Silent for longer than the 2 s floor on the idle limit: a partitioned primary.
    expect(await l.waitClosed(6000)).toBe(true);
    await handshake('127.0.0.1:2');
  });
});
