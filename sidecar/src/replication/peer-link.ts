// A primary's link to one secondary: handshake, the write stream with sequence-numbered acks,
// failure detection (stream errors, keepalive, an ack deadline), reconnection with backoff, and
// the catch-up that follows every connect (baseline, bitmap or checksum resync).
import { randomUUID } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { replicationProto, type ReplicationClient } from '../../../proto';
import type { HandshakeResponse__Output } from '../../../proto/gen/lockstep/v1/HandshakeResponse';
import type { RegionChecksumsResponse__Output } from '../../../proto/gen/lockstep/v1/RegionChecksumsResponse';
import { DirtyBitmap } from '../tracking/dirty-bitmap';
import { OpKind, decodeAcks, encodeOps, encodedSize, MAX_MESSAGE_BYTES, type Op } from './frames';
import { decideResync, type Generations } from './generations';
import { markDifferingRegions, resyncDirtyRegions } from './resync';
import type { PeerHost } from './peer-host';
import {
  PEER_CHANNEL_OPTIONS,
  ReplicationStreamClient,
  SESSION_KEY,
  VOLUME_KEY,
} from './stream-method';

export type PeerState =
  | 'Connecting'
  | 'Baselining'
  | 'Resyncing'
  | 'InSync'
  | 'OutOfSync'
  | 'Disconnected'
  | 'SplitBrain'
  | 'PeerIsPrimary'
  | 'PeerIsNewer';

const STREAMING: ReadonlySet<PeerState> = new Set(['Baselining', 'Resyncing', 'InSync']);

/** Writes larger than this travel as several ops, so a message stays below gRPC's limit. */
const MAX_OP_DATA = 1024 * 1024;
const RPC_DEADLINE_MS = 5_000;
const RETRY_MIN_MS = 200;
const RETRY_MAX_MS = 5_000;
const REFUSED_RETRY_MS = 5_000;

/**
 * Parallel streams per link. One HTTP/2 stream moved 1 MiB writes at ~370 MB/s, four at
 * ~720 MB/s (measured with a bare client against the secondary): grpc-js processes each
 * stream's messages one after another, so lanes let large writes overlap.
 */
const LANES = 4;

interface Lane {
  stream: grpc.ClientDuplexStream<Buffer, Buffer>;
  /** The stream asked us to wait for 'drain'. */
  blocked: boolean;
}

/** A queued op; a FLUSH is queued once per lane (it covers only what went before it there). */
type Queued = Op & { lane?: number };

interface Pending {
  resolve: () => void;
  reject: (err: Error) => void;
  sentAt: number;
}

export interface PeerLinkOptions {
  /** An op not acknowledged within this time fails the link (a half-open peer). */
  ackTimeoutMs: number;
}

export interface ResyncProgress {
  kind: 'baseline' | 'bitmap' | 'full';
  doneBytes: number;
  totalBytes: number;
  startedAt: number;
}

export class PeerUnavailable extends LockstepError {
  constructor(address: string, why: string) {
    super('LOCKSTEP_ERR_UNAVAILABLE', `peer ${address} is unavailable: ${why}`);
  }
}

export class PeerLink {
  state: PeerState = 'Connecting';
  /** Why the link is not in sync (last failure or refusal), for status. */
  condition = '';
  node = '';
  /** Bytes sent by resync and baseline (not live writes), over the link's life. */
  resyncBytesSent = 0;
  liveBytesSent = 0;
  resync: ResyncProgress | undefined;
  lastInSyncAt = 0;
  /** Set by an operator to resolve a split brain in our favour: the next connect overwrites the peer. */
  discardPeerData = false;

  private readonly channel: grpc.Channel;
  private readonly rpc: ReplicationClient;
  private readonly streamClient: grpc.Client;
  private lanes: Lane[] = [];
  private nextLane = 0;
  private epoch = 0;
  private nextSeq = 1;
  private readonly pending = new Map<number, Pending>();
  private queue: Queued[] = [];
  private flushScheduled = false;
  private retryMs = RETRY_MIN_MS;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly sweeper: NodeJS.Timeout;
  private stopped = false;
  private readonly log: Logger;

  constructor(
    readonly address: string,
    private readonly host: PeerHost,
    private readonly opts: PeerLinkOptions,
  ) {
    this.log = host.log.child({ peer: address });
    this.channel = new grpc.Channel(
      address,
      grpc.credentials.createInsecure(),
      PEER_CHANNEL_OPTIONS,
    );
    const override = { channelOverride: this.channel };
    this.rpc = new (replicationProto().Replication)(
      address,
      grpc.credentials.createInsecure(),
      override,
    );
    this.streamClient = new ReplicationStreamClient(
      address,
      grpc.credentials.createInsecure(),
      override,
    );
    this.sweeper = setInterval(() => this.checkAcks(), Math.min(250, opts.ackTimeoutMs / 4));
    this.sweeper.unref();
  }

  start(): void {
    void this.connect();
  }

  /** Live writes go to the peer (it is connected, catching up or in sync). */
  get streaming(): boolean {
    return STREAMING.has(this.state) && this.lanes.length > 0;
  }

  // ---- the data stream ---------------------------------------------------------------------

  /** Sends one op; resolves when the peer acknowledged it, rejects if the link fails first. */
  send(
    kind: OpKind,
    offset: number,
    length: number,
    data: Buffer | undefined,
    fua: boolean,
  ): Promise<void> {
    if (!this.streaming) return Promise.reject(new PeerUnavailable(this.address, this.state));
    if (data && data.length > MAX_OP_DATA) {
      const parts: Promise<void>[] = [];
      for (let at = 0; at < data.length; at += MAX_OP_DATA) {
        const piece = data.subarray(at, at + MAX_OP_DATA);
        parts.push(this.send(kind, offset + at, piece.length, piece, fua));
      }
      return Promise.all(parts).then(() => undefined);
    }
    if (kind === OpKind.FLUSH) {
      return Promise.all(
        this.lanes.map((_, lane) => this.enqueue({ kind, fua, seq: 0, offset, length, lane })),
      ).then(() => undefined);
    }
    if (data) this.liveBytesSent += data.length;
    return this.enqueue({ kind, fua, seq: 0, offset, length, data });
  }

  private enqueue(op: Queued): Promise<void> {
    op.seq = this.nextSeq++;
    this.queue.push(op);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // Everything queued in this turn of the event loop (e.g. a socket read's worth of NBD
      // requests) travels in one message.
      process.nextTick(() => this.flushQueue());
    }
    return new Promise((resolve, reject) =>
      this.pending.set(op.seq, { resolve, reject, sentAt: performance.now() }),
    );
  }

  private flushQueue(): void {
    this.flushScheduled = false;
    const lanes = this.lanes;
    while (lanes.length > 0 && this.queue.length > 0) {
      const head = this.queue[0];
      if (head.lane !== undefined) {
        // In queue order, so it follows every op already written to its lane.
        const lane = lanes[head.lane];
        if (lane.blocked) return;
        this.write(lane, this.queue.splice(0, 1));
        continue;
      }
      const lane = this.freeLane();
      if (!lane) return;
      let bytes = 0;
      let n = 0;
      while (
        n < this.queue.length &&
        this.queue[n].lane === undefined &&
        (n === 0 || bytes + encodedSize(this.queue[n]) <= MAX_MESSAGE_BYTES)
      ) {
        bytes += encodedSize(this.queue[n]);
        n++;
      }
      this.write(lane, this.queue.splice(0, n));
    }
  }

  private freeLane(): Lane | undefined {
    for (let i = 0; i < this.lanes.length; i++) {
      const lane = this.lanes[(this.nextLane + i) % this.lanes.length];
      if (!lane.blocked) {
        this.nextLane = (this.nextLane + i + 1) % this.lanes.length;
        return lane;
      }
    }
    return undefined;
  }

  private write(lane: Lane, ops: Queued[]): void {
    // The write callback only means grpc-js took the bytes; the peer's ack is what counts.
    if (!lane.stream.write(encodeOps(ops))) {
      lane.blocked = true;
      lane.stream.once('drain', () => {
        if (!this.lanes.includes(lane)) return;
        lane.blocked = false;
        this.flushQueue();
      });
    }
  }

  private onAcks(msg: Buffer): void {
    let acks;
    try {
      acks = decodeAcks(msg);
    } catch (err) {
      return this.fail(`malformed ack from peer: ${errorMessage(err)}`);
    }
    for (const a of acks) {
      const p = this.pending.get(a.seq);
      if (!p) continue;
      this.pending.delete(a.seq);
      if (a.errno === 0) p.resolve();
      else
        p.reject(
          new LockstepError(
            'LOCKSTEP_ERR_IO',
            `peer ${this.address} failed op ${a.seq} with errno ${a.errno}`,
          ),
        );
    }
  }

  private checkAcks(): void {
    const oldest = this.pending.values().next();
    if (oldest.done) return;
    const age = performance.now() - oldest.value.sentAt;
    if (age > this.opts.ackTimeoutMs) this.fail(`no acknowledgement for ${Math.round(age)} ms`);
  }

  // ---- connection lifecycle ----------------------------------------------------------------

  /** Drops the connection: pending ops fail (the host marks them dirty), reconnect follows. */
  fail(reason: string): void {
    if (this.stopped) return;
    const wasStreaming = this.lanes.length > 0;
    this.teardown(reason);
    if (wasStreaming || this.state === 'Connecting') {
      this.log.warn({ reason }, 'peer link failed');
    }
    this.condition = reason;
    this.setState(
      this.host.tracking.bitmap(this.address).dirtyRegions > 0 ? 'OutOfSync' : 'Disconnected',
    );
    this.scheduleRetry(this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  private teardown(reason: string): void {
    this.epoch++;
    const lanes = this.lanes;
    this.lanes = [];
    for (const l of lanes) l.stream.cancel();
    this.queue = [];
    const err = new PeerUnavailable(this.address, reason);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(err);
  }

  private scheduleRetry(ms: number): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => void this.connect(), ms);
    this.retryTimer.unref();
  }

  private setState(state: PeerState): void {
    if (state === this.state) return;
    const from = this.state;
    this.state = state;
    if (state === 'InSync') this.lastInSyncAt = Date.now();
    this.host.onPeerState(this, from, state);
  }

  /** A unary call on the peer with the RPC deadline; failures become PeerUnavailable. */
  private unary<Res>(
    invoke: (
      options: grpc.CallOptions,
      cb: (err: grpc.ServiceError | null, res?: Res) => void,
    ) => unknown,
  ): Promise<Res> {
    return new Promise((resolve, reject) =>
      invoke({ deadline: Date.now() + RPC_DEADLINE_MS }, (err, res) =>
        err ? reject(new PeerUnavailable(this.address, err.details || err.message)) : resolve(res!),
      ),
    );
  }

  regionChecksums(firstRegion: number, count: number): Promise<Buffer> {
    return this.unary<RegionChecksumsResponse__Output>((o, cb) =>
      this.rpc.RegionChecksums(
        {
          volume: this.host.volumeName,
          regionSize: this.host.regionSize,
          firstRegion,
          count,
        },
        o,
        cb,
      ),
    ).then((r) => r.digests);
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const epoch = ++this.epoch;
    const host = this.host;
    const stale = () => this.stopped || epoch !== this.epoch;
    try {
      const gen = host.generations();
      const hello = await this.unary<HandshakeResponse__Output>((o, cb) =>
        this.rpc.Handshake(
          {
            volume: host.volumeName,
            uuid: host.uuid,
            sizeBytes: host.sizeBytes,
            regionSize: host.regionSize,
            createIfMissing: true,
            primaryNode: host.localNode,
            primaryAddress: host.localAddress,
            generation: gen,
            mode: host.mode,
          },
          o,
          cb,
        ),
      );
      if (stale()) return;
      this.node = hello.node;
      const remote: Generations = {
        current: hello.generation?.current ?? '',
        history: hello.generation?.history ?? [],
      };
      let decision = decideResync(
        { ...gen, bitmapUuid: host.bitmapUuid(this.address) },
        { ...remote, role: hello.role === 'primary' ? 'primary' : 'secondary' },
      );
      if (
        decision.kind === 'refuse' &&
        decision.condition !== 'PeerIsPrimary' &&
        this.discardPeerData
      ) {
        this.log.warn(
          { condition: decision.condition },
          'discarding the peer’s diverging writes, as requested',
        );
        decision = {
          kind: 'full',
          reason: `${decision.condition} resolved by discarding the peer's writes`,
        };
      }
      if (decision.kind === 'refuse') {
        this.condition = decision.reason;
        this.log.error(
          { condition: decision.condition, reason: decision.reason, remote, local: gen },
          'peer refused',
        );
        this.setState(decision.condition);
        this.scheduleRetry(REFUSED_RETRY_MS);
        return;
      }
      const bitmap = host.tracking.bitmap(this.address);
      if (hello.differs.length > 0) {
        bitmap.merge(DirtyBitmap.fromBuffer(host.sizeBytes, host.regionSize, hello.differs));
      }
      if (decision.kind === 'baseline') bitmap.setAll();

      const md = new grpc.Metadata();
      md.set(VOLUME_KEY, host.volumeName);
      md.set(SESSION_KEY, hello.session);
      for (let i = 0; i < LANES; i++) {
        const stream = this.streamClient.makeBidiStreamRequest<Buffer, Buffer>(
          '/lockstep.v1.ReplicationStream/Replicate',
          (b: Buffer) => b,
          (b: Buffer) => b,
          md,
        );
        this.lanes.push({ stream, blocked: false });
        stream.on('data', (msg: Buffer) => {
          if (epoch === this.epoch) this.onAcks(msg);
        });
        stream.on('error', (err: grpc.ServiceError) => {
          if (epoch === this.epoch) this.fail(`stream error: ${err.details || err.message}`);
        });
        stream.on('end', () => {
          if (epoch === this.epoch) this.fail('peer closed the stream');
        });
      }
      this.retryMs = RETRY_MIN_MS;
      this.condition = '';
      this.setState(decision.kind === 'baseline' ? 'Baselining' : 'Resyncing');
      this.log.info(
        { decision: decision.kind, node: hello.node, dirtyBytes: bitmap.dirtyBytes() },
        'peer connected',
      );

      if (decision.kind === 'full' || host.tracking.isUntrusted(this.address)) {
        this.resync = {
          kind: 'full',
          doneBytes: 0,
          totalBytes: host.sizeBytes,
          startedAt: Date.now(),
        };
        await markDifferingRegions(this, host, () => stale());
        host.tracking.trust(this.address);
      }
      const kind =
        decision.kind === 'baseline' ? 'baseline' : decision.kind === 'full' ? 'full' : 'bitmap';
      this.resync = { kind, doneBytes: 0, totalBytes: bitmap.dirtyBytes(), startedAt: Date.now() };
      await resyncDirtyRegions(this, host, () => stale());
      if (stale()) return;
      await this.unary<unknown>((o, cb) =>
        this.rpc.SetGeneration(
          {
            volume: host.volumeName,
            generation: host.generations(),
          },
          o,
          cb,
        ),
      );
      if (stale()) return;
      await host.onPeerCaughtUp(this);
      this.discardPeerData = false;
      this.resync = undefined;
      this.setState('InSync');
      this.log.info({ resyncBytesSent: this.resyncBytesSent }, 'peer in sync');
    } catch (err) {
      if (!stale()) this.fail(errorMessage(err));
    }
  }

  /** Resolves a refusal (split brain, newer peer) by overwriting the peer on the next connect. */
  discardPeer(): void {
    this.discardPeerData = true;
    if (!this.streaming) this.scheduleRetry(0);
  }

  /** Tells the peer this primary steps down cleanly (so it may be promoted without --force). */
  async announceLeaving(): Promise<void> {
    await this.unary<unknown>((o, cb) =>
      this.rpc.PrimaryLeaving({ volume: this.host.volumeName }, o, cb),
    );
  }

  /** Sends a generation change to a peer that is in sync. */
  async pushGeneration(): Promise<void> {
    await this.unary<unknown>((o, cb) =>
      this.rpc.SetGeneration(
        {
          volume: this.host.volumeName,
          generation: this.host.generations(),
        },
        o,
        cb,
      ),
    );
  }

  stop(): void {
    if (this.stopped) return;
    this.teardown('link stopped');
    this.stopped = true;
    clearInterval(this.sweeper);
    clearTimeout(this.retryTimer);
    this.streamClient.close();
    this.rpc.close();
    this.channel.close();
  }
}

export const newSessionId = (): string => randomUUID();
