// The replication data channel's wire format. The data path skips gRPC and protobuf: a primary
// opens a few plain TCP connections ("lanes", see data-lane.ts) to the data address its
// secondary advertised in Handshake, and each carries, after a hello, a stream of op records
// one way and ack records the other. Every record says its own length, so both sides parse the
// stream in place without a message layer. All integers are big-endian.
//
// primary → secondary, once per connection, HELLO (HELLO_BYTES + name):
//   u32 magic        HELLO_MAGIC
//   u16 version      PROTOCOL_VERSION
//   u16 lane         0 .. MAX_LANES-1, each used once per session
//   u32 keepaliveMs  the primary pings at least this often; silence for longer is a dead link
//   u16 nameLength   1 .. MAX_NAME_BYTES
//   u16 reserved     0
//   16 bytes token   the session from Handshake (one-time: a new handshake replaces it)
//   u64 epoch        the primary's epoch, the one its Handshake named (see below)
//   name             the volume, UTF-8
//
// secondary → primary, the answer to HELLO (REPLY_BYTES + message):
//   u32 magic        REPLY_MAGIC
//   u16 version      PROTOCOL_VERSION
//   u16 status       0 accepted; anything else: refused, and the secondary closes
//   u32 length       bytes of UTF-8 message that follow (why it was refused), ≤ MAX_REPLY_MESSAGE
//
// then primary → secondary, op records (OP_HEADER_BYTES + payload):
//   u8  kind     1 WRITE | 2 ZERO | 3 FLUSH | 4 PING
//   u8  flags    bit 0: FUA (durable before the ack)
//                bit 1: BULK (catch-up data, baseline or resync: the secondary may write it
//                       around its page cache)
//                bit 2: ORDERED (async mode: applied only after every ORDERED op received
//                       before it on this lane has been, so the copy always holds a prefix of
//                       the primary's writes; other bits are ignored)
//   u16 reserved 0
//   u32 length   WRITE: payload bytes that follow (≤ MAX_WRITE_BYTES); ZERO: bytes to zero
//   u64 seq      per-link sequence number, echoed by the ack
//   u64 offset   byte offset in the volume
//   u64 epoch    the primary's epoch when it sent the op
//   [length payload bytes, WRITE only]
//
// and secondary → primary, ack records (ACK_BYTES):
//   u8  kind 0x81, u8 reserved, u16 reserved, u32 errno, u64 seq
//   errno: 0 done, 5 EIO, 28 ENOSPC, 116 ESTALE (the op's epoch is older than the copy's)
//
// Epochs are fencing tokens (Kleppmann): the mediator grants each one once, and a copy that has
// seen epoch e refuses a hello or an op from an older one, so a primary that was replaced while
// it was cut off or paused cannot have a late write applied, however its clock ran. ESTALE
// tells it that it was replaced: it fences itself (engine/epoch-authority.ts).
//
// Ops in flight never overlap (the primary's region locks guarantee it), so the secondary may
// apply them concurrently, except ORDERED ones (async mode, where a write is acknowledged
// before the peer has it: they travel on one lane and are applied in the order sent). PING
// does nothing but come back acknowledged: it keeps an idle lane's liveness checked both ways.
//
// FLUSH: its ack means durable on the secondary's disk: every op received before it on its
// lane, and every op on any lane whose ack was sent before it arrived. One FLUSH, on one lane,
// per flush of the primary's client is enough for the client's rule (a FLUSH reply means every
// write acknowledged before it is durable on every in-sync copy):
//   - sync, strict-sync: a write is acknowledged to the client only after the secondary
//     acknowledged it, so every write the FLUSH must cover has been applied, on whatever lane,
//     before the FLUSH arrives; it may take any lane.
//   - async: a write is acknowledged to the client before the secondary has it; writes travel
//     ORDERED on lane 0, and the FLUSH follows them there.
// The secondary meets it with one fdatasync, which concurrent FLUSHes and FUA writes share
// (see FileBlockDevice.sync).

export const OpKind = { WRITE: 1, ZERO: 2, FLUSH: 3, PING: 4 } as const;
export type OpKind = (typeof OpKind)[keyof typeof OpKind];
export const OpFlag = { FUA: 1, BULK: 2, ORDERED: 4 } as const;
/** The errnos an ack carries: Linux's numbers, so logs read as usual. */
export const AckErrno = { EIO: 5, ENOSPC: 28, ESTALE: 116 } as const;
export const OP_HEADER_BYTES = 32;
export const ACK_BYTES = 16;
const ACK_KIND = 0x81;

export const HELLO_MAGIC = 0x4c4b5244; // "LKRD"
export const REPLY_MAGIC = 0x4c4b5241; // "LKRA"
export const PROTOCOL_VERSION = 2;
export const HELLO_BYTES = 40;
export const REPLY_BYTES = 12;
export const TOKEN_BYTES = 16;
export const MAX_NAME_BYTES = 255;
export const MAX_REPLY_MESSAGE = 4096;
export const MAX_LANES = 16;
/** The hard cap on one record's payload; a larger length is a protocol error, not a read. */
export const MAX_WRITE_BYTES = 4 * 1024 * 1024;

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

/** `flags`: OpFlag bits. */
export function writeOpHeader(
  buf: Buffer,
  at: number,
  kind: OpKind,
  flags: number,
  length: number,
  seq: number,
  offset: number,
  epoch: number,
): void {
  buf[at] = kind;
  buf[at + 1] = flags;
  buf.writeUInt16BE(0, at + 2);
  buf.writeUInt32BE(length, at + 4);
  writeU64(buf, seq, at + 8);
  writeU64(buf, offset, at + 16);
  writeU64(buf, epoch, at + 24);
}

/** One op header, parsed into a reused object (the receive path allocates nothing per op). */
export class OpHeader {
  kind: OpKind = OpKind.PING;
  fua = false;
  bulk = false;
  ordered = false;
  length = 0;
  seq = 0;
  offset = 0;
  epoch = 0;

  /** Parses `buf[at, at + OP_HEADER_BYTES)`; throws FrameError if malformed. */
  parse(buf: Buffer, at: number): this {
    const kind = buf[at];
    if (kind < OpKind.WRITE || kind > OpKind.PING) throw new FrameError(`unknown op kind ${kind}`);
    this.kind = kind as OpKind;
    this.fua = (buf[at + 1] & OpFlag.FUA) !== 0;
    this.bulk = (buf[at + 1] & OpFlag.BULK) !== 0;
    this.ordered = (buf[at + 1] & OpFlag.ORDERED) !== 0;
    this.length = buf.readUInt32BE(at + 4);
    this.seq = readU64(buf, at + 8);
    this.offset = readU64(buf, at + 16);
    this.epoch = readU64(buf, at + 24);
    if (this.kind === OpKind.WRITE && this.length > MAX_WRITE_BYTES)
      throw new FrameError(`write of ${this.length} bytes exceeds the ${MAX_WRITE_BYTES}-byte cap`);
    return this;
  }
}

export function writeAck(buf: Buffer, at: number, seq: number, errno: number): void {
  buf[at] = ACK_KIND;
  buf[at + 1] = 0;
  buf.writeUInt16BE(0, at + 2);
  buf.writeUInt32BE(errno, at + 4);
  writeU64(buf, seq, at + 8);
}

/** The seq of the ack record at `at` (checked to be one); its errno is `readAckErrno`. */
export function readAckSeq(buf: Buffer, at: number): number {
  if (buf[at] !== ACK_KIND) throw new FrameError(`unknown ack kind ${buf[at]}`);
  return readU64(buf, at + 8);
}

export function readAckErrno(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at + 4);
}

export interface Hello {
  lane: number;
  keepaliveMs: number;
  /** Hex, as the session string Handshake returned. */
  token: string;
  /** The primary's epoch (0 where no epoch was ever granted). */
  epoch: number;
  volume: string;
}

/** The session string Handshake hands out: TOKEN_BYTES of randomness, in hex. */
export function isToken(session: string): boolean {
  return session.length === TOKEN_BYTES * 2 && /^[0-9a-f]+$/.test(session);
}

export function encodeHello(h: Hello): Buffer {
  const name = Buffer.from(h.volume, 'utf8');
  if (name.length === 0 || name.length > MAX_NAME_BYTES) throw new FrameError('bad volume name');
  if (!isToken(h.token)) throw new FrameError('bad session token');
  const out = Buffer.alloc(HELLO_BYTES + name.length);
  out.writeUInt32BE(HELLO_MAGIC, 0);
  out.writeUInt16BE(PROTOCOL_VERSION, 4);
  out.writeUInt16BE(h.lane, 6);
  out.writeUInt32BE(h.keepaliveMs, 8);
  out.writeUInt16BE(name.length, 12);
  Buffer.from(h.token, 'hex').copy(out, 16);
  writeU64(out, h.epoch, 32);
  name.copy(out, HELLO_BYTES);
  return out;
}

/** Checks the fixed part of a hello; returns the name length that follows. */
export function helloNameLength(buf: Buffer): number {
  const magic = buf.readUInt32BE(0);
  if (magic !== HELLO_MAGIC)
    throw new FrameError(`bad hello magic 0x${magic.toString(16)} (not a Lockstep primary?)`);
  const version = buf.readUInt16BE(4);
  if (version !== PROTOCOL_VERSION)
    throw new FrameError(
      `unsupported protocol version ${version} (this agent speaks ${PROTOCOL_VERSION}: upgrade the older agent)`,
    );
  const nameLength = buf.readUInt16BE(12);
  if (nameLength === 0 || nameLength > MAX_NAME_BYTES)
    throw new FrameError(`bad volume name length ${nameLength}`);
  return nameLength;
}

/** The whole hello (fixed part already checked by helloNameLength). */
export function decodeHello(buf: Buffer): Hello {
  const lane = buf.readUInt16BE(6);
  if (lane >= MAX_LANES) throw new FrameError(`lane ${lane} out of range (max ${MAX_LANES - 1})`);
  return {
    lane,
    keepaliveMs: buf.readUInt32BE(8),
    token: buf.toString('hex', 16, 16 + TOKEN_BYTES),
    epoch: readU64(buf, 32),
    volume: buf.toString('utf8', HELLO_BYTES, HELLO_BYTES + buf.readUInt16BE(12)),
  };
}

export function encodeReply(status: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, MAX_REPLY_MESSAGE);
  const out = Buffer.alloc(REPLY_BYTES + text.length);
  out.writeUInt32BE(REPLY_MAGIC, 0);
  out.writeUInt16BE(PROTOCOL_VERSION, 4);
  out.writeUInt16BE(status, 6);
  out.writeUInt32BE(text.length, 8);
  text.copy(out, REPLY_BYTES);
  return out;
}

/** Checks the fixed part of a reply; returns [status, message length]. */
export function decodeReplyHeader(buf: Buffer): [number, number] {
  if (buf.readUInt32BE(0) !== REPLY_MAGIC) throw new FrameError('bad reply magic');
  if (buf.readUInt16BE(4) !== PROTOCOL_VERSION) throw new FrameError('unsupported reply version');
  const length = buf.readUInt32BE(8);
  if (length > MAX_REPLY_MESSAGE) throw new FrameError(`reply message of ${length} bytes`);
  return [buf.readUInt16BE(6), length];
}
