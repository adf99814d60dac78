// The secondary's data port: accepts the lanes primaries open (see replica-lane.ts) and hands
// each hello to `attach`, which binds the lane to a volume's replication session or refuses it.
// With TLS, a lane is a TLS session over the accepted connection, and only a client with an
// agent certificate from the cluster's CA gets as far as its hello; the certificate's node is
// the lane's `peer`, which `attach` checks against the primary that opened the session.
import net from 'node:net';
import type tls from 'node:tls';
import { BufferPool } from '../../../lib/buffer-pool';
import type { Logger } from '../../../lib/logger';
import { adoptAccepted, adoptAcceptedTls } from '../../../lib/onread-socket';
import { serviceRefusal, type RefusalSink } from '../../../lib/tls/access-policy';
import { verifiedClient } from '../../../lib/tls/identity';
import type { Transport } from '../../../lib/tls/transport';
import { ReplicaLane, type LaneAttach } from './replica-lane';

/** Read scratch per lane: a burst of small ops, or a good part of a large one, per read. */
const SCRATCH_BYTES = 256 * 1024;
/** A client that has not finished its TLS handshake by then is dropped. */
const TLS_HANDSHAKE_MS = 10_000;

export class DataListener {
  private readonly lanes = new Set<ReplicaLane>();
  private readonly pool = new BufferPool();
  private secureContext: tls.SecureContext | undefined;

  private constructor(
    private readonly server: net.Server,
    /** HOST:PORT as bound. */
    readonly address: string,
    private readonly attach: LaneAttach,
    private readonly log: Logger,
    transport: Transport,
    private readonly refused: RefusalSink,
  ) {
    if (transport.secure) {
      this.secureContext = transport.dir.secureContext;
      // New lanes get the rotated certificate; the open ones keep their TLS sessions.
      transport.dir.onChange(() => (this.secureContext = transport.dir.secureContext));
    }
    server.on('connection', (s) => this.accept(s));
    server.on('error', (err) => log.error({ err: err.message }, 'data listener error'));
  }

  static async listen(
    host: string,
    port: number,
    attach: LaneAttach,
    log: Logger,
    transport: Transport,
    refused: RefusalSink,
  ): Promise<DataListener> {
    const server = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const bound = server.address() as net.AddressInfo;
    const shown = bound.family === 'IPv6' ? `[${bound.address}]` : bound.address;
    return new DataListener(server, `${shown}:${bound.port}`, attach, log, transport, refused);
  }

  private accept(accepted: net.Socket): void {
    const remote = `${accepted.remoteAddress}:${accepted.remotePort}`;
    // Acks are small writes: Nagle would hold each one back until the last was ACKed. Set on the
    // descriptor, it stays with the handle the lane's socket takes over.
    accepted.setNoDelay(true);
    if (this.secureContext) return this.acceptTls(accepted, remote, this.secureContext);
    let lane: ReplicaLane | undefined;
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    const socket = adoptAccepted(accepted, scratch, () => lane);
    lane = new ReplicaLane(socket, scratch, this.attach, this.pool, this.log, remote);
    this.track(lane, socket);
    socket.resume();
  }

  private acceptTls(accepted: net.Socket, remote: string, secureContext: tls.SecureContext): void {
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    let lane: ReplicaLane | undefined;
    const socket = adoptAcceptedTls(
      accepted,
      { secureContext, requestCert: true, rejectUnauthorized: true },
      scratch,
      () => lane,
    );
    lane = new ReplicaLane(socket, scratch, this.attach, this.pool, this.log, remote, true);
    const opened = lane;
    const handshake = setTimeout(() => socket.destroy(), TLS_HANDSHAKE_MS);
    // A plaintext client, another CA's certificate, an expired one: refused here, by TLS.
    socket.once('error', (err: Error) => {
      clearTimeout(handshake);
      this.log.warn({ remote, err: err.message }, 'data lane refused: TLS handshake failed');
      socket.destroy();
    });
    socket.once('secure', () => {
      clearTimeout(handshake);
      const client = verifiedClient(socket);
      const peer = typeof client === 'string' ? undefined : client;
      const reason = typeof client === 'string' ? client : serviceRefusal('data-lane', peer);
      if (reason !== undefined) {
        this.refused({ service: 'data-lane', what: 'open a data lane', caller: peer, reason });
        socket.destroy();
        return;
      }
      opened.peer = peer;
    });
    this.track(opened, socket);
  }

  private track(lane: ReplicaLane, socket: net.Socket): void {
    this.lanes.add(lane);
    socket.once('close', () => this.lanes.delete(lane));
  }

  /** Stops accepting and closes every lane. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const lane of this.lanes) lane.close('agent stopping');
    await closed;
  }
}
