// The replication data stream's binary frames. Writes are the hot path, so they skip protobuf:
// each gRPC message on the `lockstep.v1.ReplicationStream/Replicate` stream is a raw buffer of
// back-to-back records (layout below, all integers big-endian). The primary batches whatever
// is queued when the stream is ready into one message; the secondary answers with batched acks.
//
// primary → secondary, one or more ops per message:
//   u8  kind     1 WRITE | 2 ZERO | 3 FLUSH
//   u8  flags    bit 0: FUA (durable before the ack)
//   u16 reserved 0
//   u32 length   WRITE: payload bytes that follow; ZERO: bytes to zero; FLUSH: 0
//   u64 seq      per-stream sequence number, echoed by the ack
//   u64 offset   byte offset in the volume
//   [length payload bytes, WRITE only]
//
// secondary → primary, one message of acks:
//   u8  kind 0x81 (ACKS), u8 reserved, u16 count, u32 reserved
//   count × { u64 seq, u32 errno (0 = done), u32 reserved }
//
// Ops in flight never overlap (the primary's region locks guarantee it), so the secondary may
// apply them concurrently; a FLUSH covers every op received before it.

export const OpKind = { WRITE: 1, ZERO: 2, FLUSH: 3 } as const;
export type OpKind = (typeof OpKind)[keyof typeof OpKind];
export const OP_FLAG_FUA = 1;
export const OP_HEADER_BYTES = 24;
const ACKS_KIND = 0x81;
const ACK_BYTES = 16;
const ACKS_HEADER_BYTES = 8;
/** Messages stay well below grpc-js's default 4 MiB receive limit. */
export const MAX_MESSAGE_BYTES = 3 * 1024 * 1024;

export interface Op {
  kind: OpKind;
  fua: boolean;
  seq: number;
  offset: number;
  /** WRITE: the data; otherwise undefined. */
  data?: Buffer;
  /** ZERO: bytes to zero. */
  length: number;
}

export class FrameError extends Error {}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  if (hi >= 0x200000) throw new FrameError('64-bit field exceeds the safe integer range');
  return hi * 0x100000000 + buf.readUInt32BE(at + 4);
}

export function encodedSize(op: Op): number {
  return OP_HEADER_BYTES + (op.kind === OpKind.WRITE ? op.data!.length : 0);
}

/** One message holding `ops`, copied once into a single buffer. */
export function encodeOps(ops: readonly Op[]): Buffer {
  let total = 0;
  for (const op of ops) total += encodedSize(op);
  const out = Buffer.allocUnsafe(total);
  let at = 0;
  for (const op of ops) {
    out.writeUInt8(op.kind, at);
    out.writeUInt8(op.fua ? OP_FLAG_FUA : 0, at + 1);
    out.writeUInt16BE(0, at + 2);
    out.writeUInt32BE(op.kind === OpKind.WRITE ? op.data!.length : op.length, at + 4);
    writeU64(out, op.seq, at + 8);
    writeU64(out, op.offset, at + 16);
    at += OP_HEADER_BYTES;
    if (op.kind === OpKind.WRITE) {
      op.data!.copy(out, at);
      at += op.data!.length;
    }
  }
  return out;
}

/** The ops in a message; WRITE data are views into `msg` (no copy). Throws FrameError if malformed. */
export function decodeOps(msg: Buffer): Op[] {
  const ops: Op[] = [];
  let at = 0;
  while (at < msg.length) {
    if (msg.length - at < OP_HEADER_BYTES) throw new FrameError('truncated op header');
    const kind = msg.readUInt8(at);
    const fua = (msg.readUInt8(at + 1) & OP_FLAG_FUA) !== 0;
    const length = msg.readUInt32BE(at + 4);
    const seq = readU64(msg, at + 8);
    const offset = readU64(msg, at + 16);
    at += OP_HEADER_BYTES;
    switch (kind) {
      case OpKind.WRITE:
        if (msg.length - at < length) throw new FrameError('truncated write payload');
        ops.push({ kind, fua, seq, offset, length, data: msg.subarray(at, at + length) });
        at += length;
        break;
      case OpKind.ZERO:
      case OpKind.FLUSH:
        ops.push({ kind, fua, seq, offset, length });
        break;
      default:
        throw new FrameError(`unknown op kind ${kind}`);
    }
  }
  return ops;
}

export interface Ack {
  seq: number;
  errno: number;
}

export function encodeAcks(acks: readonly Ack[]): Buffer {
  const out = Buffer.allocUnsafe(ACKS_HEADER_BYTES + acks.length * ACK_BYTES);
  out.writeUInt8(ACKS_KIND, 0);
  out.writeUInt8(0, 1);
  out.writeUInt16BE(acks.length, 2);
  out.writeUInt32BE(0, 4);
  let at = ACKS_HEADER_BYTES;
  for (const a of acks) {
    writeU64(out, a.seq, at);
    out.writeUInt32BE(a.errno, at + 8);
    out.writeUInt32BE(0, at + 12);
    at += ACK_BYTES;
  }
  return out;
}

export function decodeAcks(msg: Buffer): Ack[] {
  if (msg.length < ACKS_HEADER_BYTES || msg.readUInt8(0) !== ACKS_KIND)
    throw new FrameError('not an ack message');
  const count = msg.readUInt16BE(2);
  if (msg.length !== ACKS_HEADER_BYTES + count * ACK_BYTES)
    throw new FrameError('ack count does not match length');
  const acks: Ack[] = [];
  for (let i = 0, at = ACKS_HEADER_BYTES; i < count; i++, at += ACK_BYTES) {
    acks.push({ seq: readU64(msg, at), errno: msg.readUInt32BE(at + 8) });
  }
  return acks;
}

/** Max acks per message (u16 count). */
export const MAX_ACKS_PER_MESSAGE = 0xffff;
