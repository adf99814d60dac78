// The node agent: owns the data directory and its volumes, serves them over NBD, exposes the
// Agent control API over gRPC and metrics over HTTP. `stop()` drains and flushes everything.
import path from 'node:path';
import { LockstepError } from '../../lib/errors';
import type { Logger } from '../../lib/logger';
import { agentProto } from '../../proto';
import { agentHandlers } from './control/agent-service';
import { startGrpcServer, type BoundServer } from './control/grpc-server';
import { NbdServer } from './frontend/nbd/server';
import { AgentMetrics } from './metrics';
import { lockDataDir, type DataDirLock } from './store/data-dir-lock';
import { VolumeStore, type Volume } from './store/volume-store';
import { mkdir } from 'node:fs/promises';

export interface AgentOptions {
  node: string;
  dataDir: string;
  /** gRPC control API, HOST:PORT (port 0 picks a free one). */
  listen: string;
  nbdSocket?: string;
  /** Opt-in NBD over TCP, HOST:PORT. */
  nbdListen?: string;
  metricsListen?: string;
  log: Logger;
}

export interface VolumeView {
  name: string;
  uuid: string;
  sizeBytes: number;
  allocatedBytes: number;
  readOnly: boolean;
  state: Volume['state'];
  error: string;
  clients: number;
  exportUri: string;
}

function splitHostPort(value: string, flag: string): [string, number] {
  const i = value.lastIndexOf(':');
  const port = Number(value.slice(i + 1));
  if (i <= 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${flag} must be HOST:PORT, got ${JSON.stringify(value)}`,
    );
  }
  return [value.slice(0, i).replace(/^\[|\]$/g, ''), port];
}

export class Agent {
  readonly startedAtMs = Date.now();
  grpcAddress = '';
  nbdTcpAddress = '';
  metricsAddress = '';
  private grpc: BoundServer | undefined;
  private metricsServer: { close(): Promise<void> } | undefined;
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly options: AgentOptions,
    readonly nbdSocket: string,
    private readonly lock: DataDirLock,
    readonly store: VolumeStore,
    readonly nbd: NbdServer,
    readonly metrics: AgentMetrics,
  ) {}

  static async start(options: AgentOptions): Promise<Agent> {
    const { log } = options;
    const [grpcHost] = splitHostPort(options.listen, '--listen');
    await mkdir(options.dataDir, { recursive: true, mode: 0o700 });
    const lock = await lockDataDir(options.dataDir);
    try {
      const store = await VolumeStore.open(options.dataDir);
      for (const v of store.list()) {
        if (v.state === 'Failed')
          log.error(
            { volume: v.name, code: v.error.code, err: v.error.message },
            'volume not served',
          );
      }
      const metrics = new AgentMetrics(store, options.node);
      const nbdLog = log.child({ subsystem: 'nbd' });
      const nbd = new NbdServer(store, nbdLog, metrics.observeRequest, (name, n) =>
        metrics.setClients(name, n),
      );
      const nbdSocket = options.nbdSocket ?? path.join(options.dataDir, 'nbd.sock');
      const agent = new Agent(options, nbdSocket, lock, store, nbd, metrics);
      await nbd.listenUnix(nbdSocket);
      if (options.nbdListen)
        agent.nbdTcpAddress = await nbd.listenTcp(
          ...splitHostPort(options.nbdListen, '--nbd-listen'),
        );
      agent.grpc = await startGrpcServer(options.listen, [
        [agentProto().Agent.service, agentHandlers(agent)],
      ]);
      agent.grpcAddress = agent.grpc.address.replace(/^[^:]*(?=:\d+$)/, grpcHost);
      if (options.metricsListen) {
        const served = await metrics.serve(
          ...splitHostPort(options.metricsListen, '--metrics-listen'),
        );
        agent.metricsServer = served;
        agent.metricsAddress = served.address;
      }
      log.info(
        {
          node: options.node,
          dataDir: options.dataDir,
          grpc: agent.grpcAddress,
          nbdSocket,
          nbdTcp: agent.nbdTcpAddress || undefined,
          metrics: agent.metricsAddress || undefined,
          volumes: store.list().length,
        },
        'agent ready',
      );
      return agent;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  exportUri(name: string): string {
    return `nbd+unix:///${name}?socket=${this.nbdSocket}`;
  }

  view(volume: Volume): VolumeView {
    const ready = volume.state === 'Ready';
    return {
      name: volume.name,
      uuid: ready ? volume.meta.uuid : '',
      sizeBytes: ready ? volume.meta.sizeBytes : 0,
      allocatedBytes: this.store.allocatedBytes(volume),
      readOnly: ready ? volume.meta.readOnly : false,
      state: volume.state,
      error: ready ? '' : volume.error.message,
      clients: this.nbd.clientsOf(volume.name),
      exportUri: ready ? this.exportUri(volume.name) : '',
    };
  }

  volumes(): VolumeView[] {
    return this.store.list().map((v) => this.view(v));
  }

  async createVolume(name: string, sizeBytes: number, readOnly: boolean): Promise<VolumeView> {
    const volume = await this.store.create(name, sizeBytes, readOnly);
    this.options.log.info(
      { volume: name, sizeBytes, readOnly, uuid: this.view(volume).uuid },
      'volume created',
    );
    return this.view(volume);
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    this.store.get(name);
    const clients = this.nbd.clientsOf(name);
    if (clients > 0) {
      if (!force) {
        throw new LockstepError(
          'LOCKSTEP_ERR_VOLUME_IN_USE',
          `volume ${name} has ${clients} NBD client(s) attached; disconnect them or delete with --force`,
        );
      }
      await this.nbd.disconnectExport(name);
    }
    await this.store.delete(name);
    this.metrics.forgetVolume(name);
    this.options.log.info({ volume: name, force, disconnectedClients: clients }, 'volume deleted');
  }

  /** Drains NBD requests in flight, flushes every volume, closes all listeners. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      const { log } = this.options;
      log.info('agent stopping: draining NBD requests');
      await this.nbd.shutdown();
      await this.store.flushAll();
      await this.grpc?.close();
      await this.metricsServer?.close();
      this.store.close();
      await this.lock.release();
      log.info('agent stopped; all volumes flushed');
    })();
    return this.stopping;
  }
}
