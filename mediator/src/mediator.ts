// `lockstep mediator`: the tiebreaker of a third failure domain. It owns a data dir (locked, one
// mediator per dir), keeps the groups' records there (record-store.ts) and serves the Mediator
// gRPC service. It decides nothing on its own: every epoch it grants was asked for by a copy
// with the epoch it expected, and at most one such ask succeeds per epoch.
import { promises as fs } from 'node:fs';
import { unary } from '../../lib/grpc-errors';
import { lockDataDir, type DataDirLock } from '../../lib/data-dir-lock';
import { LockstepError } from '../../lib/errors';
import type { Logger } from '../../lib/logger';
import { startGrpcServer, type BoundServer } from '../../lib/grpc-server';
import { mediatorProto, type MediatorHandlers } from '../../proto';
import { RecordStore } from './record-store';
import { guardService, logRefusal } from '../../lib/tls/access-policy';
import { serverCredentials, type Transport } from '../../lib/tls/transport';

export interface MediatorOptions {
  dataDir: string;
  listen: string;
  /** Mutual TLS (agents, the operator and administrators may call), or --insecure. */
  transport: Transport;
  log: Logger;
}

/** A group name: what the agents and the operator call a consistency group. */
const GROUP = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;

export class Mediator {
  private constructor(
    private readonly lock: DataDirLock,
    private readonly store: RecordStore,
    private readonly server: BoundServer,
    private readonly log: Logger,
  ) {}

  get address(): string {
    return this.server.address;
  }

  /** Resolves with why, if records can no longer be written (the process should exit). */
  get failed(): Promise<LockstepError> {
    return this.store.failed;
  }

  static async start(opts: MediatorOptions): Promise<Mediator> {
    await fs.mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
    const lock = await lockDataDir(opts.dataDir, 'mediator');
    let store: RecordStore | undefined;
    try {
      store = await RecordStore.open(opts.dataDir);
      const guarded = guardService('mediator', handlers(store, opts.log), opts.transport, (r) =>
        logRefusal(opts.log, r),
      );
      const server = await startGrpcServer(
        opts.listen,
        [[mediatorProto().Mediator.service, guarded]],
        serverCredentials(opts.transport),
      );
      opts.log.info(
        { listen: server.address, dataDir: opts.dataDir, groups: store.list().length },
        'mediator serving',
      );
      return new Mediator(lock, store, server, opts.log);
    } catch (err) {
      await store?.close();
      await lock.release();
      throw err;
    }
  }

  async stop(): Promise<void> {
    await this.server.close();
    await this.store.close();
    await this.lock.release();
    this.log.info('mediator stopped');
  }
}

function handlers(store: RecordStore, log: Logger): MediatorHandlers {
  return {
    GetRecord: unary((req) => store.get(group(req.group))),
    ListRecords: unary(() => ({ records: store.list() })),
    CompareAndSwap: unary(async (req) => {
      const name = group(req.group);
      if (!req.primary) {
        throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', 'a swap names the new primary');
      }
      const result = await store.compareAndSwap(
        name,
        req.expectedEpoch,
        req.primary,
        req.inSync,
        req.atLeast,
      );
      log.info(
        {
          group: name,
          expectedEpoch: req.expectedEpoch,
          primary: req.primary,
          granted: result.granted,
          epoch: result.record.epoch,
          holder: result.record.primary,
        },
        result.granted ? 'epoch granted' : 'epoch refused: the group moved on',
      );
      return result;
    }),
  };
}

function group(name: string): string {
  if (!GROUP.test(name)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `group ${JSON.stringify(name)} is not a valid name (letters, digits, '.', '_', '-'; 1-253 characters)`,
    );
  }
  return name;
}
