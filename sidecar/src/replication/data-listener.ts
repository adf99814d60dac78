// The secondary's data port: accepts the lanes primaries open (see replica-lane.ts) and hands
// each hello to `attach`, which binds the lane to a volume's replication session or refuses it.
import net from 'node:net';
import { BufferPool } from '../../../lib/buffer-pool';
import type { Logger } from '../../../lib/logger';
import { adoptAccepted } from '../../../lib/onread-socket';
import { ReplicaLane, type LaneAttach } from './replica-lane';

/** Read scratch per lane: a burst of small ops, or a good part of a large one, per read. */
const SCRATCH_BYTES = 256 * 1024;

export class DataListener {
  private readonly lanes = new Set<ReplicaLane>();
  private readonly pool = new BufferPool();

  private constructor(
    private readonly server: net.Server,
    /** HOST:PORT as bound. */
    readonly address: string,
    private readonly attach: LaneAttach,
    private readonly log: Logger,
  ) {
    server.on('connection', (s) => this.accept(s));
    server.on('error', (err) => log.error({ err: err.message }, 'data listener error'));
  }

  static async listen(
    host: string,
    port: number,
    attach: LaneAttach,
    log: Logger,
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
    return new DataListener(server, `${shown}:${bound.port}`, attach, log);
  }

  private accept(accepted: net.Socket): void {
    const remote = `${accepted.remoteAddress}:${accepted.remotePort}`;
    let lane: ReplicaLane | undefined;
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    const socket = adoptAccepted(accepted, scratch, () => lane);
    lane = new ReplicaLane(socket, scratch, this.attach, this.pool, this.log, remote);
    this.lanes.add(lane);
    const added = lane;
    socket.once('close', () => this.lanes.delete(added));
    socket.resume();
  }

  /** Stops accepting and closes every lane. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const lane of this.lanes) lane.close('agent stopping');
    await closed;
  }
}
