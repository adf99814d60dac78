// A loopback TCP proxy that tests put between two agents to break the link between them in the
// ways real networks do: slow it down, let it go silent (a partition, where neither side hears
// a FIN or RST and only keepalives can notice), refuse it, or reset it.
import net from 'node:net';

export type ProxyMode = 'pass' | 'blackhole' | 'refuse';

/** Ends a socket with an RST where the runtime can, so the peer sees ECONNRESET and not a clean EOF. */
function abort(socket: net.Socket): void {
  if (socket.destroyed) return;
  try {
    socket.resetAndDestroy();
  } catch {
    // Only TCP handles can be reset; anything else is simply closed.
    socket.destroy();
  }
}

/** One direction of a connection, with its own queue so a delay never reorders chunks. */
class Direction {
  private readonly queue: { chunk: Buffer; due: number }[] = [];
  private timer: NodeJS.Timeout | undefined;
  private srcEnded = false;

  constructor(
    private readonly conn: Connection,
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
  ) {
    src.on('data', (chunk: Buffer) => this.onData(chunk));
    src.on('end', () => {
      this.srcEnded = true;
      this.flush();
    });
    dst.on('drain', () => {
      if (!conn.blackholed) src.resume();
    });
  }

  private onData(chunk: Buffer): void {
    if (this.conn.blackholed) return;
    this.queue.push({ chunk, due: Date.now() + this.conn.proxy.delayMs });
    this.flush();
  }

  private flush(): void {
    if (this.conn.blackholed) return;
    const now = Date.now();
    // Only the head is ever released, so a chunk that arrived after a delay was shortened still
    // waits behind the earlier, longer-delayed ones.
    while (this.queue.length > 0 && this.queue[0].due <= now) {
      const { chunk } = this.queue.shift()!;
      if (this.dst.destroyed) continue;
      this.conn.proxy.bytesForwarded += chunk.length;
      if (!this.dst.write(chunk)) this.src.pause();
    }
    if (this.queue.length > 0) {
      if (this.timer === undefined) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          this.flush();
        }, this.queue[0].due - now);
      }
      return;
    }
    // The FIN goes out after the data that preceded it, never ahead of a delayed chunk.
    if (this.srcEnded && !this.dst.destroyed && !this.dst.writableEnded) this.dst.end();
  }

  /** Throws away everything in flight and keeps reading so the sender is never held back. */
  discard(): void {
    this.stopTimer();
    this.queue.length = 0;
    this.src.resume();
  }

  stopTimer(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

class Connection {
  blackholed = false;
  private readonly directions: Direction[] = [];

  constructor(
    readonly proxy: TcpProxy,
    readonly client: net.Socket,
    readonly upstream: net.Socket | undefined,
  ) {
    client.on('error', () => {});
    if (upstream === undefined) {
      this.blackholed = true;
      client.on('data', () => {});
      return;
    }
    upstream.on('error', () => {});
    this.directions.push(
      new Direction(this, client, upstream),
      new Direction(this, upstream, client),
    );
    const follow = (from: net.Socket, to: net.Socket) =>
      from.once('close', (hadError) => {
        // A silent link says nothing, even when one end gives up.
        if (this.blackholed) return;
        // A clean close after EOF is passed on by the Direction once the queue drains; anything
        // else (a reset, or a close without EOF) must not look like an orderly end to the peer.
        if (hadError || !from.readableEnded) abort(to);
      });
    follow(client, upstream);
    follow(upstream, client);
  }

  get sockets(): net.Socket[] {
    return this.upstream ? [this.client, this.upstream] : [this.client];
  }

  get closed(): boolean {
    return this.sockets.every((s) => s.destroyed);
  }

  blackhole(): void {
    // Bytes dropped from the middle of a stream cannot be given back, so a blackholed
    // connection stays silent for good; only new connections see a later 'pass'.
    this.blackholed = true;
    for (const d of this.directions) d.discard();
  }

  abort(): void {
    for (const d of this.directions) d.stopTimer();
    for (const s of this.sockets) abort(s);
  }
}

export class TcpProxy {
  bytesForwarded = 0;
  private mode: ProxyMode = 'pass';
  private delay = 0;
  private readonly conns = new Set<Connection>();

  private constructor(
    private readonly server: net.Server,
    private readonly targetHost: string,
    private readonly targetPort: number,
    readonly address: string,
  ) {
    server.on('connection', (socket) => this.accept(socket));
    server.on('error', () => {});
  }

  static async start(target: string, listenPort = 0): Promise<TcpProxy> {
    const colon = target.lastIndexOf(':');
    const host = target.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
    const port = Number(target.slice(colon + 1));
    if (colon <= 0 || !Number.isInteger(port) || port <= 0 || port > 65535) {
      throw new Error(`bad proxy target ${JSON.stringify(target)}: want HOST:PORT`);
    }
    // Half-open sockets let each side's FIN travel on its own, as it would without the proxy.
    const server = net.createServer({ allowHalfOpen: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listenPort, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    const { port: bound } = server.address() as net.AddressInfo;
    return new TcpProxy(server, host, port, `127.0.0.1:${bound}`);
  }

  get delayMs(): number {
    return this.delay;
  }

  get connectionCount(): number {
    let n = 0;
    for (const c of this.conns) if (!c.client.destroyed) n++;
    return n;
  }

  /** Adds one-way latency (ms) to every chunk in both directions from now on. */
  setDelay(ms: number): void {
    if (!(ms >= 0)) throw new Error(`bad delay ${ms}`);
    this.delay = ms;
  }

  /**
   * 'pass': forward. 'blackhole': keep every socket open but silently discard all bytes both
   * ways (a half-open peer: no FIN, no RST), and accept new connections that also go nowhere.
   * 'refuse': destroy new connections immediately.
   */
  setMode(mode: ProxyMode): void {
    this.mode = mode;
    if (mode === 'blackhole') for (const c of this.conns) c.blackhole();
  }

  /** Destroys all current connections abruptly, with an RST where possible. */
  dropAll(): void {
    for (const c of this.conns) c.abort();
    this.conns.clear();
  }

  /** Stops listening and destroys everything. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.dropAll();
    await closed;
  }

  private accept(client: net.Socket): void {
    client.on('error', () => {});
    switch (this.mode) {
      case 'refuse':
        abort(client);
        return;
      case 'blackhole':
        this.track(new Connection(this, client, undefined));
        return;
      case 'pass': {
        client.setNoDelay(true);
        // Writes made while this is still connecting are buffered by the socket itself.
        const upstream = net.connect({
          host: this.targetHost,
          port: this.targetPort,
          allowHalfOpen: true,
          noDelay: true,
        });
        this.track(new Connection(this, client, upstream));
        return;
      }
    }
  }

  private track(conn: Connection): void {
    this.conns.add(conn);
    for (const s of conn.sockets) {
      s.once('close', () => {
        if (conn.closed) this.conns.delete(conn);
      });
    }
  }
}
