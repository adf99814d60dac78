// The secondary's side of replication: answers a primary's handshake (creating the copy on
// first contact), applies the primary's stream of writes and acknowledges each one, and
// serves region checksums for checksum-based resync.
import type * as grpc from '@grpc/grpc-js';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { toServiceError, unary } from '../../../lib/grpc-errors';
import type { Logger } from '../../../lib/logger';
import type { ReplicationHandlers } from '../../../proto';
import type { ReplicatedVolume } from '../engine/replicated-volume';
import { REPLICATION_MODES, type NewVolume, type ReplicationMode } from '../store/volume-metadata';
import { validateVolumeName } from '../store/volume-store';
import { DirtyBitmap } from '../tracking/dirty-bitmap';
import { encodeAcks, decodeOps, MAX_ACKS_PER_MESSAGE, OpKind, type Ack } from './frames';
import { ZERO_GENERATION } from './generations';
import { regionDigest } from './resync';
import { SESSION_KEY, VOLUME_KEY, tuneStreamConnection } from './stream-method';

export interface ReplicaHost {
  readonly node: string;
  readonly log: Logger;
  replicated(name: string): ReplicatedVolume | undefined;
  createReplica(spec: NewVolume): Promise<ReplicatedVolume>;
}

const EIO = 5;
const ENOSPC = 28;

function needVolume(host: ReplicaHost, name: string): ReplicatedVolume {
  const rv = host.replicated(name);
  if (!rv)
    throw new LockstepError(
      'LOCKSTEP_ERR_VOLUME_NOT_FOUND',
      `volume ${JSON.stringify(name)} does not exist on node ${host.node}`,
    );
  return rv;
}

export function replicationHandlers(host: ReplicaHost): ReplicationHandlers {
  return {
    Handshake: unary(async (req) => {
      validateVolumeName(req.volume);
      const mode = req.mode as ReplicationMode;
      if (!REPLICATION_MODES.includes(mode)) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `unknown replication mode ${JSON.stringify(req.mode)}`,
        );
      }
      new DirtyBitmap(req.sizeBytes, req.regionSize); // rejects a bad geometry with a clear error
      let rv = host.replicated(req.volume);
      if (!rv) {
        if (!req.createIfMissing) needVolume(host, req.volume);
        rv = await host.createReplica({
          name: req.volume,
          sizeBytes: req.sizeBytes,
          uuid: req.uuid,
          role: 'secondary',
          generation: ZERO_GENERATION,
          replication: {
            mode,
            regionSize: req.regionSize,
            maxResyncBytesPerSecond: 0,
            peers: [{ address: req.primaryAddress, node: req.primaryNode, bitmapUuid: null }],
          },
        });
        host.log.info(
          { volume: req.volume, primary: req.primaryAddress, sizeBytes: req.sizeBytes },
          'replica created',
        );
      }
      if (rv.uuid !== req.uuid) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `volume ${req.volume} on node ${host.node} has UUID ${rv.uuid} but the primary's is ${req.uuid}: ` +
            'a different volume with the same name; delete one or use another name',
        );
      }
      if (rv.sizeBytes !== req.sizeBytes) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `volume ${req.volume} on node ${host.node} is ${rv.sizeBytes} bytes, the primary's ${req.sizeBytes}`,
        );
      }
      const { differs } = await rv.acceptPrimary({
        address: req.primaryAddress,
        node: req.primaryNode,
        mode,
        regionSize: req.regionSize,
      });
      return {
        node: host.node,
        role: rv.meta.role,
        generation: rv.meta.generation,
        differs,
        session: rv.session,
      };
    }),
    RegionChecksums: unary(async (req) => {
      const rv = needVolume(host, req.volume);
      const bitmap = new DirtyBitmap(rv.sizeBytes, req.regionSize);
      if (req.count > 4096 || req.firstRegion + req.count > bitmap.regionCount) {
        throw new LockstepError(
          'LOCKSTEP_ERR_OUT_OF_RANGE',
          `checksum request for regions ${req.firstRegion}+${req.count} is out of range`,
        );
      }
      const digests = Buffer.allocUnsafe(16 * req.count);
      for (let i = 0; i < req.count; i++) {
        const { offset, length } = bitmap.regionRange(req.firstRegion + i);
        const data = Buffer.allocUnsafe(length);
        await rv.local.readUncached(offset, data);
        regionDigest(data).copy(digests, 16 * i);
      }
      return { digests };
    }),
    SetGeneration: unary(async (req) => {
      const rv = needVolume(host, req.volume);
      await rv.adoptGeneration({
        current: req.generation?.current ?? '',
        history: req.generation?.history ?? [],
      });
      return {};
    }),
    PrimaryLeaving: unary((req) => {
      needVolume(host, req.volume).primaryLeaving();
      return {};
    }),
  };
}

/** Applies one primary's stream of ops to the local copy and acknowledges them. */
export function replicateStreamHandler(host: ReplicaHost) {
  return (call: grpc.ServerDuplexStream<Buffer, Buffer>): void => {
    const name = String(call.metadata.get(VOLUME_KEY)[0] ?? '');
    const session = String(call.metadata.get(SESSION_KEY)[0] ?? '');
    const rv = host.replicated(name);
    const refuse = (err: LockstepError) => {
      call.emit('error', toServiceError(err));
      call.destroy();
    };
    if (!rv || rv.meta.role !== 'secondary' || !session || session !== rv.session) {
      refuse(
        new LockstepError(
          'LOCKSTEP_ERR_NOT_ALLOWED',
          `no replication session ${session} for volume ${name} on node ${host.node} (handshake first; a primary copy takes no stream)`,
        ),
      );
      return;
    }
    tuneStreamConnection(call);
    rv.primaryStreamOpened();
    const local = rv.local;
    const inFlight = new Set<Promise<void>>();
    let acks: Ack[] = [];
    let ackScheduled = false;
    let open = true;

    const sendAcks = () => {
      ackScheduled = false;
      while (acks.length > 0 && open) call.write(encodeAcks(acks.splice(0, MAX_ACKS_PER_MESSAGE)));
    };
    const ack = (seq: number, errno: number) => {
      acks.push({ seq, errno });
      if (!ackScheduled) {
        ackScheduled = true;
        // Acks of every op that completes in this turn of the event loop leave together.
        setImmediate(sendAcks);
      }
    };
    const track = (seq: number, work: Promise<void>) => {
      const p: Promise<void> = work.then(
        () => ack(seq, 0),
        (err: unknown) => {
          host.log.warn({ volume: name, seq, err: errorMessage(err) }, 'replicated op failed');
          ack(
            seq,
            err instanceof LockstepError && err.code === 'LOCKSTEP_ERR_NO_SPACE' ? ENOSPC : EIO,
          );
        },
      );
      const tracked = p.finally(() => inFlight.delete(tracked));
      inFlight.add(tracked);
    };

    call.on('data', (msg: Buffer) => {
      if (rv.meta.role !== 'secondary') {
        refuse(
          new LockstepError(
            'LOCKSTEP_ERR_NOT_ALLOWED',
            `volume ${name} was promoted on node ${host.node}; it takes no more replicated writes`,
          ),
        );
        return;
      }
      let ops;
      try {
        ops = decodeOps(msg);
      } catch (err) {
        refuse(
          new LockstepError(
            'LOCKSTEP_ERR_INVALID_ARGUMENT',
            `malformed replication frame: ${errorMessage(err)}`,
          ),
        );
        return;
      }
      for (const op of ops) {
        switch (op.kind) {
          case OpKind.WRITE:
            track(op.seq, local.write(op.offset, op.data!, op.fua));
            break;
          case OpKind.ZERO:
            track(op.seq, local.writeZeroes(op.offset, op.length, { fua: op.fua, noHole: false }));
            break;
          case OpKind.FLUSH:
            // Covers every op received before it, finished or not.
            track(
              op.seq,
              Promise.allSettled([...inFlight]).then(() => local.flush()),
            );
            break;
        }
      }
    });
    const done = () => {
      if (!open) return;
      open = false;
      acks = [];
      rv.primaryStreamClosed();
    };
    call.on('end', () => {
      void Promise.allSettled([...inFlight]).then(() => {
        sendAcks();
        call.end();
        done();
      });
    });
    call.on('error', done);
    call.on('close', done);
    call.on('cancelled', done);
  };
}
