// The proxy that tests use to break links between agents: each way of breaking a link has to
// look to both ends the way a real network would, or the tests built on it prove nothing.
import net from 'node:net';
import { freePort } from '../harness/processes';
import { TcpProxy } from '../harness/tcp-proxy';

/** A client socket that remembers what it received and how it ended. */
class Client {
  received = Buffer.alloc(0);
  closed = false;
  error: Error | undefined;
  private readonly closedP: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.received = Buffer.concat([this.received, c]);
    });
    socket.on('error', (err) => {
      this.error = err;
    });
    this.closedP = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        resolve();
      }),
    );
  }

  /** Starts connecting without waiting, for connections that are expected to fail. */
  static open(address: string): Client {
    const [host, port] = address.split(':');
    const client = new Client(net.connect({ host, port: Number(port) }));
    clients.push(client);
    return client;
  }

  static connect(address: string): Promise<Client> {
    const client = Client.open(address);
    return new Promise((resolve, reject) => {
      client.socket.once('connect', () => {
        client.socket.off('error', reject);
        resolve(client);
      });
      client.socket.once('error', reject);
    });
  }

  /** Resolves with the received bytes once there are at least n, or with what came in time. */
  async read(n: number, timeoutMs: number): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.received.length < n && !this.closed && Date.now() < deadline) await sleep(5);
    return this.received;
  }

  /** Resolves true if the socket closed within the timeout. */
  waitClosed(timeoutMs: number): Promise<boolean> {
    return Promise.race([this.closedP.then(() => true), sleep(timeoutMs).then(() => false)]);
  }
}

/** An echo server that counts what it saw, so tests can tell "never arrived" from "not sent back". */
class EchoServer {
  connections = 0;
  bytesIn = 0;
  readonly sockets = new Set<net.Socket>();

  private constructor(
    readonly server: net.Server,
    readonly address: string,
  ) {}

  /** With `stalled`, it accepts connections but never reads, to build up backpressure. */
  static async start(stalled = false): Promise<EchoServer> {
    const port = await freePort();
    const server = net.createServer();
    const echo = new EchoServer(server, `127.0.0.1:${port}`);
    server.on('connection', (s) => {
      echo.connections++;
      echo.sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => echo.sockets.delete(s));
      if (stalled) return;
      s.on('data', (c: Buffer) => {
        echo.bytesIn += c.length;
        s.write(c);
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => resolve());
    });
    return echo;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
let clients: Client[] = [];
let echo: EchoServer;
let proxy: TcpProxy;

beforeEach(async () => {
  echo = await EchoServer.start();
  proxy = await TcpProxy.start(echo.address);
});

/** Fails instead of hanging until jest's backstop when cleanup itself is broken. */
async function within<T>(what: string, p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

afterEach(async () => {
  for (const c of clients) c.socket.destroy();
  clients = [];
  await within('proxy.close()', proxy.close(), 5000);
  await echo.close();
});

async function roundTrip(c: Client, payload: Buffer, timeoutMs = 2000): Promise<Buffer> {
  const before = c.received.length;
  c.socket.write(payload);
  const got = await c.read(before + payload.length, timeoutMs);
  return got.subarray(before);
}

describe('TcpProxy', () => {
  it('listens on loopback and forwards both ways, counting bytes', async () => {
    expect(proxy.address).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(proxy.address).not.toBe(echo.address);
    const c = await Client.connect(proxy.address);
    const payload = Buffer.from('hello through the proxy');
    expect((await roundTrip(c, payload)).toString()).toBe(payload.toString());
    expect(proxy.bytesForwarded).toBe(2 * payload.length);
    expect(proxy.connectionCount).toBe(1);
    expect(echo.connections).toBe(1);
  });

  it('listens on the port it is given', async () => {
    const port = await freePort();
    const fixed = await TcpProxy.start(echo.address, port);
    try {
      expect(fixed.address).toBe(`127.0.0.1:${port}`);
      const c = await Client.connect(fixed.address);
      expect((await roundTrip(c, Buffer.from('x'))).toString()).toBe('x');
    } finally {
      await within('proxy.close()', fixed.close(), 5000);
    }
  });

  it('carries a large transfer intact in both directions', async () => {
    const c = await Client.connect(proxy.address);
    const payload = Buffer.alloc(8 * 2 ** 20);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
    const got = await roundTrip(c, payload, 20_000);
    expect(got.length).toBe(payload.length);
    expect(got.equals(payload)).toBe(true);
    expect(proxy.bytesForwarded).toBe(2 * payload.length);
  });

  it('holds the sender back when the receiver stops reading', async () => {
    const stalled = await EchoServer.start(true);
    const slow = await TcpProxy.start(stalled.address);
    try {
      const c = await Client.connect(slow.address);
      const size = 64 * 2 ** 20;
      c.socket.write(Buffer.alloc(size));
      await sleep(500);
      // Kernel buffers on the two hops hold a few MiB each; a proxy that ignored backpressure
      // would have taken all 64 MiB off the client by now.
      expect(c.socket.writableLength).toBeGreaterThan(size / 4);
      expect(slow.bytesForwarded).toBeLessThan(size * 0.75);
    } finally {
      for (const c of clients) c.socket.destroy();
      await within('proxy.close()', slow.close(), 5000);
      await stalled.close();
    }
  });

  it('delays each direction by the set latency', async () => {
    const c = await Client.connect(proxy.address);
    expect((await roundTrip(c, Buffer.from('warm'))).toString()).toBe('warm');
    proxy.setDelay(100);
    const start = Date.now();
    const got = await roundTrip(c, Buffer.from('slow'));
    const elapsed = Date.now() - start;
    expect(got.toString()).toBe('slow');
    expect(elapsed).toBeGreaterThanOrEqual(150);
    expect(elapsed).toBeLessThan(2000);
  });

  it('keeps chunks in order when the delay shrinks while they are in flight', async () => {
    const c = await Client.connect(proxy.address);
    proxy.setDelay(200);
    c.socket.write('first;');
    await sleep(20);
    proxy.setDelay(0);
    c.socket.write('second;');
    // Without the queue, 'second;' would overtake 'first;' by ~180 ms.
    expect((await c.read(13, 2000)).toString()).toBe('first;second;');
  });

  it('passes a half-close on only after the delayed data before it', async () => {
    const c = await Client.connect(proxy.address);
    proxy.setDelay(100);
    c.socket.end('last words');
    // The echo server answers a FIN with its own once it has written back what it read.
    expect(await c.waitClosed(2000)).toBe(true);
    expect(c.received.toString()).toBe('last words');
    expect(c.error).toBeUndefined();
  });

  it('blackholes existing and new connections without closing them, and passes new ones again after', async () => {
    const c = await Client.connect(proxy.address);
    expect((await roundTrip(c, Buffer.from('before'))).toString()).toBe('before');
    const forwarded = proxy.bytesForwarded;
    const seenByServer = echo.bytesIn;

    proxy.setMode('blackhole');
    expect((await roundTrip(c, Buffer.from('lost'), 300)).length).toBe(0);
    expect(c.closed).toBe(false);
    expect(c.error).toBeUndefined();
    expect(c.socket.destroyed).toBe(false);

    const fresh = await Client.connect(proxy.address);
    expect((await roundTrip(fresh, Buffer.from('nowhere'), 300)).length).toBe(0);
    expect(fresh.closed).toBe(false);
    expect(fresh.error).toBeUndefined();
    expect(proxy.connectionCount).toBe(2);
    expect(echo.bytesIn).toBe(seenByServer);
    expect(echo.connections).toBe(1);
    expect(proxy.bytesForwarded).toBe(forwarded);

    proxy.setMode('pass');
    const healed = await Client.connect(proxy.address);
    expect((await roundTrip(healed, Buffer.from('after'))).toString()).toBe('after');
    // The old stream lost bytes, so it must stay silent rather than resume with a gap.
    expect((await roundTrip(c, Buffer.from('gap'), 300)).length).toBe(0);
    expect(c.closed).toBe(false);
  });

  it('refuses new connections but leaves existing ones working', async () => {
    const c = await Client.connect(proxy.address);
    expect((await roundTrip(c, Buffer.from('one'))).toString()).toBe('one');
    proxy.setMode('refuse');
    // The kernel completes the handshake before the proxy sees the socket, so the client may
    // connect and only then be cut off; either way it must end up closed with nothing read.
    const refused = Client.open(proxy.address);
    expect(await refused.waitClosed(2000)).toBe(true);
    expect(refused.received.length).toBe(0);
    expect(echo.connections).toBe(1);
    expect((await roundTrip(c, Buffer.from('two'))).toString()).toBe('two');
    expect(proxy.connectionCount).toBe(1);
  });

  it('drops existing connections on both sides', async () => {
    const a = await Client.connect(proxy.address);
    const b = await Client.connect(proxy.address);
    expect((await roundTrip(a, Buffer.from('a'))).toString()).toBe('a');
    expect((await roundTrip(b, Buffer.from('b'))).toString()).toBe('b');
    expect(echo.sockets.size).toBe(2);
    proxy.dropAll();
    expect(await a.waitClosed(2000)).toBe(true);
    expect(await b.waitClosed(2000)).toBe(true);
    const deadline = Date.now() + 2000;
    while (echo.sockets.size > 0 && Date.now() < deadline) await sleep(10);
    expect(echo.sockets.size).toBe(0);
    expect(proxy.connectionCount).toBe(0);
    // Still listening and forwarding afterwards.
    const c = await Client.connect(proxy.address);
    expect((await roundTrip(c, Buffer.from('again'))).toString()).toBe('again');
  });

  it('resets the client when the target refuses', async () => {
    const closedPort = await freePort();
    const dead = await TcpProxy.start(`127.0.0.1:${closedPort}`);
    try {
      const c = Client.open(dead.address);
      expect(await c.waitClosed(2000)).toBe(true);
      expect(c.received.length).toBe(0);
    } finally {
      await within('proxy.close()', dead.close(), 5000);
    }
  });

  it('closes everything and stops listening on close()', async () => {
    const c = await Client.connect(proxy.address);
    expect((await roundTrip(c, Buffer.from('x'))).toString()).toBe('x');
    proxy.setMode('blackhole');
    const silent = await Client.connect(proxy.address);
    await within('proxy.close()', proxy.close(), 5000);
    expect(await c.waitClosed(2000)).toBe(true);
    expect(await silent.waitClosed(2000)).toBe(true);
    expect(proxy.connectionCount).toBe(0);
    await expect(Client.connect(proxy.address)).rejects.toThrow(/ECONNREFUSED/);
  });
});
