// The secondary's end of one data lane: a hello that names the volume, lane and session token,
// then a stream of op records applied to the local copy and answered with acks (layout in
// frames.ts). The parser is an explicit state machine; each state names the bytes it waits
// for. Reads land in a reused scratch buffer, or, while a write's payload is incomplete,
// straight into that payload's pooled buffer (see lib/onread-socket.ts): one copy out of the
// kernel and no allocation per op. Bad input closes this connection only, with the reason
// logged; every op before it was applied and acknowledged or is re-sent by the primary.
import type { Identity } from '../../../lib/tls/identity';
import type { Socket } from 'node:net';
import type { BufferPool } from '../../../lib/buffer-pool';
import { ElementCollector } from '../../../lib/element-collector';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import type { FileBlockDevice } from '../store/file-device';
import { FlushBarrier } from './flush-barrier';
import {
  ACK_BYTES,
  AckErrno,
  FrameError,
  HELLO_BYTES,
  OP_HEADER_BYTES,
  OpHeader,
  OpKind,
  decodeHello,
  encodeReply,
  helloNameLength,
  writeAck,
  type Hello,
} from './frames';

/** What a lane is bound to once its hello is accepted: the copy it writes. */
export interface LaneBinding {
  readonly device: FileBlockDevice;
  /** The newest epoch the copy has seen: an op from an older one is refused (ESTALE). */
  readonly epoch: number;
  /** Counts a write's payload, taken from the primary. */
  received(bytes: number): void;
  /** The lane closed; the session forgets it. */
  detach(): void;
}

/** Finds the session a hello names; throws a LockstepError that says why it is refused. */
export type LaneAttach = (hello: Hello, lane: ReplicaLane) => LaneBinding;

type Phase =
  | { kind: 'hello' }
  | { kind: 'hello-name'; nameLength: number; fixed: Buffer }
  // Once the hello is accepted, the lane is bound to a session's copy until it closes.
  | { kind: 'op-header'; bound: LaneBinding }
  | {
      kind: 'write-payload';
      bound: LaneBinding;
      seq: number;
      offset: number;
      fua: boolean;
      payload: Buffer;
      /** Catch-up data (baseline, resync): written around the page cache if it can be. */
      bulk: boolean;
      /** Applied after the ORDERED ops received before it (see frames.ts). */
      ordered: boolean;
      filled: number;
    }
  | { kind: 'closed' };

/** A connection that has not said who it is by then is dropped. */
const HELLO_TIMEOUT_MS = 10_000;
/** Above this many payload bytes being applied, stop reading (the primary's TCP backs up). */
const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;
/** Acks are appended here and written in one piece per event-loop turn. */
const ACK_ARENA_BYTES = 64 * 1024;
/** However short the primary's keepalive, give it this long before calling the lane dead. */
const MIN_IDLE_MS = 2_000;

/** How long a refused connection stays open for its reason to reach the primary. */
const REFUSE_LINGER_MS = 1_000;

let nextLaneId = 1;

export class ReplicaLane {
  readonly id = nextLaneId++;
  private phase: Phase = { kind: 'hello' };
  private readonly collector = new ElementCollector();
  private readonly header = new OpHeader();
  private readonly barrier = new FlushBarrier();
  private inFlightBytes = 0;
  /** Settles when the last ORDERED op received so far has been applied (or failed). */
  private orderedTail: Promise<void> = Promise.resolve();
  private paused = false;
  private ackArena = Buffer.allocUnsafe(ACK_ARENA_BYTES);
  private ackStart = 0;
  private ackEnd = 0;
  private ackScheduled = false;
  private readonly helloTimer: NodeJS.Timeout;
  private readonly log: Logger;
  /** Who dialled, from its TLS certificate (undefined on a plaintext port). */
  peer: Identity | undefined;

  /** `socket` must deliver reads to `onRead`, into the buffer `readBuffer()` names. */
  constructor(
    /** A TCP socket, or a TLS socket over one. */
    private readonly socket: Socket,
    /** Where reads land unless a write payload is being filled. */
    private readonly scratch: Buffer,
    private readonly attach: LaneAttach,
    private readonly pool: BufferPool,
    log: Logger,
    readonly remote: string,
    /** A TLS lane: it binds to a session only once its certificate has been verified. */
    readonly secure = false,
  ) {
    this.log = log.child({ lane: this.id, remote });
    socket.setNoDelay(true);
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'data lane socket error'));
    socket.on('timeout', () => this.close('no traffic from the primary within its keepalive'));
    socket.on('close', () => this.onClose());
    this.helloTimer = setTimeout(() => this.refuse('no hello in time'), HELLO_TIMEOUT_MS);
  }

  // ---- input ---------------------------------------------------------------------------------

  readBuffer(): Buffer {
    const phase = this.phase;
    return phase.kind === 'write-payload' ? phase.payload.subarray(phase.filled) : this.scratch;
  }

  onRead(n: number, buf: Buffer): void {
    if (this.phase.kind === 'closed') return;
    try {
      if (buf !== this.scratch) this.onPayloadBytes(n);
      else this.parse(buf, n);
    } catch (err) {
      if (err instanceof FrameError) this.protocolError(err.message);
      else this.protocolError(`internal error: ${errorMessage(err)}`);
    }
  }

  private onPayloadBytes(n: number): void {
    const phase = this.phase;
    if (phase.kind !== 'write-payload') throw new Error('payload bytes outside a write');
    phase.filled += n;
    if (phase.filled === phase.payload.length) {
      this.phase = { kind: 'op-header', bound: phase.bound };
      this.applyWrite(phase.bound, phase.seq, phase.offset, phase.payload, phase);
    }
  }

  private elementSize(): number {
    const phase = this.phase;
    switch (phase.kind) {
      case 'hello':
        return HELLO_BYTES;
      case 'hello-name':
        return phase.nameLength;
      case 'op-header':
        return OP_HEADER_BYTES;
      case 'write-payload':
      case 'closed':
        return 0;
    }
  }

  private parse(buf: Buffer, end: number): void {
    let off = 0;
    while (off < end) {
      const phase = this.phase;
      if (phase.kind === 'closed') return;
      if (phase.kind === 'write-payload') {
        const k = Math.min(end - off, phase.payload.length - phase.filled);
        buf.copy(phase.payload, phase.filled, off, off + k);
        off += k;
        this.onPayloadBytes(k);
        continue;
      }
      // A header split across reads is copied; one inside this read is parsed in place.
      const element = this.collector.take(this.elementSize(), buf, off, end);
      off += this.collector.used;
      if (element) this.onElement(element);
    }
  }

  /** One complete element for the current state; `bytes` is valid only during this call. */
  private onElement(bytes: Buffer): void {
    const phase = this.phase;
    switch (phase.kind) {
      case 'hello':
        this.phase = {
          kind: 'hello-name',
          nameLength: helloNameLength(bytes),
          fixed: Buffer.from(bytes),
        };
        return;
      case 'hello-name':
        return this.onHello(Buffer.concat([phase.fixed, bytes]));
      case 'op-header':
        return this.onOp(phase.bound, this.header.parse(bytes, 0));
      case 'write-payload':
      case 'closed':
        throw new Error(`no element in state ${phase.kind}`);
    }
  }

  // ---- hello ---------------------------------------------------------------------------------

  private onHello(raw: Buffer): void {
    clearTimeout(this.helloTimer);
    const hello = decodeHello(raw);
    let bound: LaneBinding;
    try {
      bound = this.attach(hello, this);
    } catch (err) {
      return this.refuse(errorMessage(err));
    }
    // The primary pings every keepaliveMs; a few missed in a row means it is gone (a partition
    // sends no FIN), and the session must not stay held by a dead lane.
    this.socket.setTimeout(Math.max(MIN_IDLE_MS, 4 * hello.keepaliveMs));
    this.phase = { kind: 'op-header', bound };
    this.socket.write(encodeReply(0, ''));
    this.log.debug({ volume: hello.volume, laneIndex: hello.lane }, 'data lane attached');
  }

  // ---- ops -----------------------------------------------------------------------------------

  private onOp(bound: LaneBinding, h: OpHeader): void {
    if (h.epoch < bound.epoch) return this.staleOp(h, bound.epoch);
    const device = bound.device;
    switch (h.kind) {
      case OpKind.WRITE: {
        // Catch-up data is received where it can be written around the page cache, if it can.
        const payload =
          (h.bulk ? device.tryAlignedBuffer(h.offset, h.length) : undefined) ??
          this.pool.acquire(h.length);
        if (h.length === 0) return this.applyWrite(bound, h.seq, h.offset, payload, h);
        this.phase = {
          kind: 'write-payload',
          bound,
          seq: h.seq,
          offset: h.offset,
          fua: h.fua,
          payload,
          bulk: h.bulk,
          ordered: h.ordered,
          filled: 0,
        };
        return;
      }
      case OpKind.ZERO: {
        const { offset, length, fua } = h;
        return this.track(
          h.seq,
          0,
          this.inOrder(h.ordered, () => device.writeZeroes(offset, length, { fua, noHole: false })),
        );
      }
      case OpKind.FLUSH: {
        // The ops before it on this lane first; device.flush() then covers them and every op
        // already acknowledged on any lane (the FLUSH contract in frames.ts).
        return this.track(
          h.seq,
          0,
          this.barrier.barrier().then(() => device.flush()),
        );
      }
      case OpKind.PING:
        return this.ack(h.seq, 0);
    }
  }

  private applyWrite(
    bound: LaneBinding,
    seq: number,
    offset: number,
    payload: Buffer,
    { fua, bulk, ordered }: { fua: boolean; bulk: boolean; ordered: boolean },
  ): void {
    const device = bound.device;
    bound.received(payload.length);
    this.inFlightBytes += payload.length;
    if (this.inFlightBytes > MAX_INFLIGHT_BYTES && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    const work = this.inOrder(ordered, () =>
      bulk && !fua ? device.writeAround(offset, payload) : device.write(offset, payload, fua),
    );
    this.track(seq, payload.length, work, payload, device);
  }

  /** Starts `op` now, or, if `ordered`, once the ORDERED ops received before it are done. */
  private inOrder(ordered: boolean, op: () => Promise<void>): Promise<void> {
    if (!ordered) return op();
    const work = this.orderedTail.then(op);
    this.orderedTail = work.then(
      () => undefined,
      () => undefined,
    );
    return work;
  }

  /** `payload` (of a write) goes back to `device` or the pool once the op is done. */
  private track(
    seq: number,
    bytes: number,
    work: Promise<void>,
    payload?: Buffer,
    device?: FileBlockDevice,
  ): void {
    const span = this.barrier.begin();
    work.then(
      () => this.done(seq, span, bytes, 0, payload, device),
      (err: unknown) => {
        this.log.warn({ seq, err: errorMessage(err) }, 'replicated op failed');
        const noSpace = err instanceof LockstepError && err.code === 'LOCKSTEP_ERR_NO_SPACE';
        this.done(seq, span, bytes, noSpace ? AckErrno.ENOSPC : AckErrno.EIO, payload, device);
      },
    );
  }

  private done(
    seq: number,
    span: number,
    bytes: number,
    errno: number,
    payload?: Buffer,
    device?: FileBlockDevice,
  ): void {
    if (payload) this.releasePayload(payload, device);
    this.barrier.end(span);
    this.inFlightBytes -= bytes;
    if (this.paused && this.inFlightBytes <= MAX_INFLIGHT_BYTES / 2) {
      this.paused = false;
      if (this.phase.kind !== 'closed') this.socket.resume();
    }
    this.ack(seq, errno);
  }

  /** A payload goes back where it came from: the device's aligned buffers or the pool. */
  private releasePayload(payload: Buffer, device: FileBlockDevice | undefined): void {
    if (!device?.releaseAlignedBuffer(payload)) this.pool.release(payload);
  }

  // ---- acks ----------------------------------------------------------------------------------

  private ack(seq: number, errno: number): void {
    if (this.socket.destroyed) return;
    if (this.ackEnd + ACK_BYTES > this.ackArena.length) {
      // The socket may still hold the written part of the old arena; it is dropped, not reused.
      const fresh = Buffer.allocUnsafe(ACK_ARENA_BYTES);
      this.ackArena.copy(fresh, 0, this.ackStart, this.ackEnd);
      this.ackEnd -= this.ackStart;
      this.ackStart = 0;
      this.ackArena = fresh;
    }
    writeAck(this.ackArena, this.ackEnd, seq, errno);
    this.ackEnd += ACK_BYTES;
    if (!this.ackScheduled) {
      this.ackScheduled = true;
      // Acks of every op that completes in this turn of the event loop leave together.
      setImmediate(() => this.sendAcks());
    }
  }

  private sendAcks(): void {
    this.ackScheduled = false;
    if (this.phase.kind === 'closed' || this.ackEnd === this.ackStart) return;
    this.socket.write(this.ackArena.subarray(this.ackStart, this.ackEnd));
    this.ackStart = this.ackEnd;
  }

  // ---- closing -------------------------------------------------------------------------------

  /** Refuses the hello with a reason the primary logs, then closes. */
  private refuse(reason: string): void {
    if (this.phase.kind === 'closed') return;
    this.log.warn({ reason }, 'data lane refused');
    this.phase = { kind: 'closed' };
    // Half-close after the reason, keep discarding input, and close for good shortly after: an
    // immediate close with unread input would reset the connection and lose the reason.
    this.socket.end(encodeReply(1, reason));
    setTimeout(() => this.socket.destroy(), REFUSE_LINGER_MS).unref();
  }

  private protocolError(reason: string): void {
    if (this.phase.kind === 'hello' || this.phase.kind === 'hello-name')
      return this.refuse(`bad hello: ${reason}`);
    this.log.warn({ reason }, 'malformed replication stream: closing the data lane');
    this.closeAfterAcks();
  }

  /**
   * An op from a primary that an epoch since has replaced (it was cut off, or paused): not
   * applied; its ESTALE ack tells the primary to fence itself, and the lane closes.
   */
  private staleOp(h: OpHeader, epoch: number): void {
    this.log.warn(
      { seq: h.seq, opEpoch: h.epoch, copyEpoch: epoch },
      'op from an older epoch refused: its primary was replaced',
    );
    this.ack(h.seq, AckErrno.ESTALE);
    this.closeAfterAcks();
  }

  private closeAfterAcks(): void {
    // Ignore the rest, but let the ops already received finish and their acks leave first, so
    // the primary only re-sends what this lane never applied.
    this.enterClosed();
    this.socket.pause();
    void this.barrier.barrier().then(() => {
      if (this.ackEnd > this.ackStart)
        this.socket.write(this.ackArena.subarray(this.ackStart, this.ackEnd));
      this.socket.destroySoon();
    });
  }

  /** Closes the connection; ops already being applied finish, their acks are dropped. */
  close(reason: string): void {
    if (this.phase.kind === 'closed') return;
    this.log.debug({ reason }, 'data lane closing');
    this.enterClosed();
    this.socket.destroy();
  }

  private onClose(): void {
    clearTimeout(this.helloTimer);
    this.enterClosed();
  }

  /**
   * Closes the lane and, if it was bound, gives the session back its lane once every op it
   * started has finished: nothing from it can land after that, so another primary may be
   * accepted. Not at the socket's 'close' event: that comes at the end of the event-loop turn,
   * after a handshake read in the same turn would have found the dead lane still holding the
   * volume.
   */
  private enterClosed(): void {
    const phase = this.phase;
    this.phase = { kind: 'closed' };
    // A payload still being received will never be applied.
    if (phase.kind === 'write-payload') this.releasePayload(phase.payload, phase.bound.device);
    if (phase.kind === 'op-header' || phase.kind === 'write-payload') {
      const bound = phase.bound;
      void this.barrier.barrier().then(() => bound.detach());
    }
  }
}
