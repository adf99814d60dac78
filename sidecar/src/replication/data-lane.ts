// The primary's end of one data lane: a TCP connection to the secondary's data port carrying op
// records out and ack records back (layout in frames.ts). Ops appended during one turn of the
// event loop leave in one write: headers and small payloads are packed into an arena buffer,
// large payloads go out as they are (the kernel copies them; we do not). Acks are parsed where
// they lie in a reused read buffer. With TLS the lane is a TLS session to a peer that must
// present an agent certificate; everything above the socket is the same.
import net from 'node:net';
import tls from 'node:tls';
import { ElementCollector } from '../../../lib/element-collector';
import { errorMessage } from '../../../lib/errors';
import { splitHostPort } from '../../../lib/host-port';
import { serverCheck, type Transport } from '../../../lib/tls/transport';
import {
  ACK_BYTES,
  OP_HEADER_BYTES,
  REPLY_BYTES,
  decodeReplyHeader,
  encodeHello,
  readAckErrno,
  readAckSeq,
  writeOpHeader,
  type Hello,
  type OpKind,
} from './frames';

/** Who hears what a lane receives. */
export interface LaneOwner {
  onAck(seq: number, errno: number): void;
  onLaneFailed(reason: string): void;
}

type Phase =
  | { kind: 'reply' }
  | { kind: 'reply-message'; status: number; length: number }
  | { kind: 'acks' }
  | { kind: 'closed' };

/** Payloads up to this size are copied into the batch: cheaper than one more write chunk. */
const INLINE_MAX = 8 * 1024;
const ARENA_BYTES = 256 * 1024;
const SCRATCH_BYTES = 64 * 1024;
/** Node's default 16 KiB would report backpressure on every batch of a few writes. */
const HIGH_WATER_MARK = 8 * 1024 * 1024;

export class DataLane {
  /** performance.now() of the last op appended, for keepalive pings. */
  lastSentAt = performance.now();
  /** Bytes appended since the last flush. */
  batchBytes = 0;
  private phase: Phase = { kind: 'reply' };
  private readonly collector = new ElementCollector();
  private arena = Buffer.allocUnsafe(ARENA_BYTES);
  private arenaUsed = 0;
  private runStart = 0;
  private readonly chunks: Buffer[] = [];
  private accepted: ((err?: Error) => void) | undefined;

  private constructor(
    private readonly socket: net.Socket,
    private readonly owner: LaneOwner,
  ) {}

  /**
   * Dials `address`, says hello, and resolves once the secondary accepted the lane; rejects
   * with the secondary's reason, a connection error, or after `timeoutMs`.
   */
  static open(
    address: string,
    hello: Hello,
    owner: LaneOwner,
    timeoutMs: number,
    transport: Transport,
  ): Promise<DataLane> {
    const [host, port] = splitHostPort(address, 'data address');
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    let lane: DataLane | undefined;
    const options = {
      host,
      port,
      noDelay: true,
      writableHighWaterMark: HIGH_WATER_MARK,
      onread: {
        buffer: scratch,
        callback: (n: number, buf: Uint8Array) => {
          lane?.onRead(buf as Buffer, n);
          return true;
        },
      },
    };
    // The hello is written at once either way: a TLS socket holds it until the handshake is done.
    const socket = transport.secure
      ? tls.connect({
          ...options,
          secureContext: transport.dir.secureContext,
          checkServerIdentity: serverCheck(['agent']),
        } as tls.ConnectionOptions)
      : net.connect(options as net.NetConnectOpts);
    lane = new DataLane(socket, owner);
    const opened = lane;
    return new Promise<DataLane>((resolve, reject) => {
      const timer = setTimeout(
        () => opened.fail(`data lane to ${address}: no answer within ${timeoutMs} ms`),
        timeoutMs,
      );
      opened.accepted = (err) => {
        clearTimeout(timer);
        opened.accepted = undefined;
        if (err) reject(err);
        else resolve(opened);
      };
      socket.on('error', (err: Error) => opened.fail(`data lane to ${address}: ${err.message}`));
      socket.on('close', () => opened.fail(`data lane to ${address} closed by the peer`));
      socket.write(encodeHello(hello));
    });
  }

  get closed(): boolean {
    return this.phase.kind === 'closed';
  }

  /** Bytes waiting in this lane: appended, or written but not yet taken by the kernel. */
  get backlog(): number {
    return this.batchBytes + this.socket.writableLength;
  }

  // ---- output --------------------------------------------------------------------------------

  /**
   * Adds one op (`flags`: OpFlag bits) to the batch the next `flush` writes. `data` must stay
   * unchanged until acked.
   */
  append(
    kind: OpKind,
    flags: number,
    length: number,
    seq: number,
    offset: number,
    epoch: number,
    data?: Buffer,
  ): void {
    const inline = data !== undefined && data.length <= INLINE_MAX;
    const need = OP_HEADER_BYTES + (inline ? data.length : 0);
    if (this.arenaUsed + need > this.arena.length) {
      // The socket may still hold runs of the old arena; it is dropped, never overwritten.
      this.endRun();
      this.arena = Buffer.allocUnsafe(Math.max(ARENA_BYTES, need));
      this.arenaUsed = this.runStart = 0;
    }
    writeOpHeader(this.arena, this.arenaUsed, kind, flags, length, seq, offset, epoch);
    this.arenaUsed += OP_HEADER_BYTES;
    if (inline) {
      data.copy(this.arena, this.arenaUsed);
      this.arenaUsed += data.length;
    } else if (data) {
      this.endRun();
      this.chunks.push(data);
    }
    this.batchBytes += OP_HEADER_BYTES + (data ? data.length : 0);
    this.lastSentAt = performance.now();
  }

  private endRun(): void {
    if (this.arenaUsed > this.runStart) {
      this.chunks.push(this.arena.subarray(this.runStart, this.arenaUsed));
      this.runStart = this.arenaUsed;
    }
  }

  /** Writes the batch: one chunk, or one writev of arena runs and large payloads. */
  flush(): void {
    this.endRun();
    const chunks = this.chunks;
    if (chunks.length === 0) return;
    this.batchBytes = 0;
    if (this.phase.kind === 'closed') {
      chunks.length = 0;
      return;
    }
    if (chunks.length === 1) {
      this.socket.write(chunks[0]);
    } else {
      this.socket.cork();
      for (const c of chunks) this.socket.write(c);
      this.socket.uncork();
    }
    chunks.length = 0;
  }

  // ---- input ---------------------------------------------------------------------------------

  private elementSize(): number {
    const phase = this.phase;
    switch (phase.kind) {
      case 'reply':
        return REPLY_BYTES;
      case 'reply-message':
        return phase.length;
      case 'acks':
        return ACK_BYTES;
      case 'closed':
        return 0;
    }
  }

  private onRead(buf: Buffer, end: number): void {
    try {
      let off = 0;
      while (off < end && this.phase.kind !== 'closed') {
        // An element split across reads is copied; one inside this read is parsed in place.
        const element = this.collector.take(this.elementSize(), buf, off, end);
        off += this.collector.used;
        if (element) this.onElement(element);
      }
    } catch (err) {
      this.fail(`malformed data from the peer: ${errorMessage(err)}`);
    }
  }

  private onElement(bytes: Buffer): void {
    const phase = this.phase;
    switch (phase.kind) {
      case 'reply': {
        const [status, length] = decodeReplyHeader(bytes);
        if (status !== 0 || length > 0) {
          this.phase = { kind: 'reply-message', status, length };
          if (length === 0) this.onReply(status, '');
          return;
        }
        return this.onReply(0, '');
      }
      case 'reply-message':
        return this.onReply(phase.status, bytes.toString('utf8'));
      case 'acks':
        return this.owner.onAck(readAckSeq(bytes, 0), readAckErrno(bytes, 0));
      case 'closed':
        throw new Error('no element in state closed');
    }
  }

  private onReply(status: number, message: string): void {
    if (status !== 0) return this.fail(`the peer refused the data lane: ${message}`);
    this.phase = { kind: 'acks' };
    this.accepted?.();
  }

  // ---- closing -------------------------------------------------------------------------------

  private fail(reason: string): void {
    if (this.phase.kind === 'closed') return;
    this.phase = { kind: 'closed' };
    this.socket.destroy();
    if (this.accepted) this.accepted(new Error(reason));
    else this.owner.onLaneFailed(reason);
  }

  /** Closes without telling the owner (it is the one closing). */
  close(): void {
    if (this.phase.kind === 'closed') return;
    this.phase = { kind: 'closed' };
    this.accepted?.(new Error('data lane closed'));
    this.socket.destroy();
  }
}
