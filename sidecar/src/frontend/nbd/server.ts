// Accepts NBD clients on a unix socket (default, mode 0660) and optionally on TCP, and serves
// the agent's volumes as exports named after them.
import { promises as fs } from 'node:fs';
import net from 'node:net';
import { LockstepError } from '../../../../lib/errors';
import type { BlockDevice } from '../../block-device';
import { BufferPool } from '../../../../lib/buffer-pool';
import { adoptAccepted, feedReads } from '../../../../lib/onread-socket';
import type { Transport } from '../../../../lib/tls/transport';

/** Read scratch per connection: many small requests, or a good part of a big one, per read. */
const SCRATCH_BYTES = 256 * 1024;
import {
  NbdConnection,
  type ConnectionLog,
  type ExportCatalog,
  type NbdExport,
  type NbdTls,
  type RequestObserver,
} from './connection';

/** Where exports come from: the agent's volumes, each as the device the frontend may use. */
export interface ExportSource {
  exportNames(): string[];
  /** The device of a servable export; throws the reason (unknown, failed) otherwise. */
  exportDevice(name: string): BlockDevice;
}

export interface NbdServerLog extends ConnectionLog {
  info(obj: object, msg: string): void;
}

export class NbdServer implements ExportCatalog {
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  private readonly attached = new Map<string, Set<NbdConnection>>();
  private readonly pool = new BufferPool();

  constructor(
    private readonly source: ExportSource,
    private readonly log: NbdServerLog,
    private readonly observe: RequestObserver,
    private readonly onAttachChange: (exportName: string, connections: number) => void = () => {},
  ) {}

  // ---- ExportCatalog -------------------------------------------------------------------------

  names(): string[] {
    return this.source.exportNames();
  }

  resolve(name: string): NbdExport | LockstepError {
    try {
      return { name, device: this.source.exportDevice(name) };
    } catch (err) {
      return err instanceof LockstepError
        ? err
        : new LockstepError('LOCKSTEP_ERR_VOLUME_FAILED', String(err));
    }
  }

  attach(conn: NbdConnection, exp: NbdExport): void {
    let set = this.attached.get(exp.name);
    if (!set) this.attached.set(exp.name, (set = new Set()));
    set.add(conn);
    this.onAttachChange(exp.name, set.size);
    this.log.info({ conn: conn.id, export: exp.name, clients: set.size }, 'nbd client attached');
  }

  detach(conn: NbdConnection, exp: NbdExport): void {
    const set = this.attached.get(exp.name);
    if (!set?.delete(conn)) return;
    if (set.size === 0) this.attached.delete(exp.name);
    this.onAttachChange(exp.name, set.size);
    this.log.info({ conn: conn.id, export: exp.name, clients: set.size }, 'nbd client detached');
  }

  // ---- listening -----------------------------------------------------------------------------

  clientsOf(name: string): number {
    return this.attached.get(name)?.size ?? 0;
  }

  /** Ends every connection to an export and waits until none is attached. */
  async disconnectExport(name: string): Promise<void> {
    const conns = [...(this.attached.get(name) ?? [])];
    for (const c of conns) c.close(true);
    await Promise.all(conns.map((c) => c.drain()));
    this.attached.delete(name);
  }

  private accept(accepted: net.Socket, tls?: NbdTls): void {
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    let conn: NbdConnection | undefined;
    let socket = accepted;
    if (tls) {
      // Before STARTTLS, 'data' events: the socket must stay wrappable by TLS.
      conn = new NbdConnection(accepted, scratch, this, this.log, this.observe, this.pool, tls);
      feedReads(accepted, conn);
    } else {
      // Reads land in the connection's scratch, or straight into a write's payload.
      socket = adoptAccepted(accepted, scratch, () => conn);
      conn = new NbdConnection(socket, scratch, this, this.log, this.observe, this.pool);
    }
    const added = conn;
    this.connections.add(added);
    socket.once('close', () => this.connections.delete(added));
    socket.resume();
  }

  async listenUnix(socketPath: string): Promise<void> {
    await removeStaleSocket(socketPath);
    const server = net.createServer({ pauseOnConnect: true }, (s) => this.accept(s));
    // Create the socket with mode 0660 from the start: a chmod after bind would leave a window.
    const previous = process.umask(0o117);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(socketPath, () => resolve());
      });
    } finally {
      process.umask(previous);
    }
    this.listeners.push(server);
  }

  /**
   * With a TLS transport, clients must STARTTLS and present a certificate from its CA;
   * plaintext (--insecure) serves anyone who can reach the port.
   */
  async listenTcp(host: string, port: number, transport: Transport): Promise<string> {
    const tls: NbdTls | undefined = transport.secure
      ? { context: () => transport.dir.secureContext }
      : undefined;
    const server = net.createServer({ pauseOnConnect: true }, (s) => this.accept(s, tls));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    this.listeners.push(server);
    const addr = server.address() as net.AddressInfo;
    return `${addr.address}:${addr.port}`;
  }

  /** Stops accepting, answers every request already received, then closes all connections. */
  async shutdown(): Promise<void> {
    await Promise.all(
      this.listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve()))),
    );
    await Promise.all([...this.connections].map((c) => c.drain()));
    for (const c of this.connections) c.close();
  }
}

async function removeStaleSocket(socketPath: string): Promise<void> {
  const stat = await fs.lstat(socketPath).catch(() => undefined);
  if (!stat) return;
  if (!stat.isSocket()) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${socketPath} exists and is not a socket; choose another --nbd-socket`,
    );
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) {
    throw new LockstepError(
      'LOCKSTEP_ERR_DATA_DIR_LOCKED',
      `${socketPath} is served by a running process; stop it or choose another --nbd-socket`,
    );
  }
  await fs.rm(socketPath, { force: true });
}
