// One NBD client connection: fixed-newstyle negotiation, then transmission. The parser is an
// explicit state machine; each state names the bytes it waits for, and one method handles each
// protocol event. Requests run concurrently and reply out of order; the device behind an export
// is only ever seen as a BlockDevice.
//
// Replies are simple unless the client negotiated structured replies; then reads and errors
// come as chunks (successes without data keep the shorter simple reply, which the spec allows),
// and metadata contexts the client selected answer BLOCK_STATUS. The Linux kernel client never
// negotiates them, and keeps exactly the simple replies it always had.
//
// Input arrives through the socket's `onread` hook (see server.ts): the kernel reads into a
// reused scratch buffer, or, while a write payload is incomplete, straight into that payload's
// pooled buffer. Headers are parsed where they lie; only a header split across two reads is
// copied. So a 1 MiB write costs one copy out of the kernel, and no allocation.
//
// On a port that requires TLS, nothing but STARTTLS (or ABORT) is answered until the client
// upgraded; the client must present a certificate from the cluster's CA. Over TLS, reads come
// decrypted as 'data' chunks and are copied into the same buffers.
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { feedReads } from '../../../../lib/onread-socket';
import { verifiedClient } from '../../../../lib/tls/identity';
import { performance } from 'node:perf_hooks';
import { isLockstepError, errorMessage, type LockstepError } from '../../../../lib/errors';
import type { BlockDevice } from '../../block-device';
import { ElementCollector } from '../../../../lib/element-collector';
import type { BufferPool } from '../../../../lib/buffer-pool';
import { matchMetaContexts, MAX_SELECTED_CONTEXTS, parseMetaContextRequest } from './meta-contexts';
import {
  ClientFlag,
  Command,
  CommandFlag,
  CHUNK_HEADER_BYTES,
  DATA_CHUNK_HEADER_BYTES,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  MAX_NAME_BYTES,
  MAX_OPTION_BYTES,
  MAX_PAYLOAD,
  MIN_BLOCK,
  NBDMAGIC,
  NbdErrno,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  PREFERRED_BLOCK,
  ReplyFlag,
  ReplyType,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  TransmissionFlag,
} from './protocol';
import { blockStatusReply, errorChunk, writeChunkHeader } from './structured-reply';

/** What a connection may be attached to. */
export interface NbdExport {
  readonly name: string;
  readonly device: BlockDevice;
}

/** How a connection finds exports; implemented by the server over the volume store. */
export interface ExportCatalog {
  names(): string[];
  /** The export, or the reason it cannot be served (unknown name, failed volume). */
  resolve(name: string): NbdExport | LockstepError;
  attach(conn: NbdConnection, exp: NbdExport): void;
  detach(conn: NbdConnection, exp: NbdExport): void;
}

export type RequestKind =
  'read' | 'write' | 'flush' | 'trim' | 'write_zeroes' | 'cache' | 'block_status' | 'invalid';

/** Per-request outcome, for metrics. Called once per request, after its reply was queued. */
export interface RequestObserver {
  (exportName: string, kind: RequestKind, bytes: number, seconds: number, errno: number): void;
}

/** TLS on a connection: required before any export is named (NBD's "forced TLS"). */
export interface NbdTls {
  /** The context for the next handshake: the current certificate, rotations included. */
  context(): tls.SecureContext;
}

export interface ConnectionLog {
  warn(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

type Phase =
  | { kind: 'client-flags' }
  | { kind: 'option-header' }
  | { kind: 'option-data'; option: number; length: number }
  | { kind: 'option-too-big'; option: number; remaining: number }
  // From here on the connection serves one export, carried by every later phase.
  | { kind: 'request-header'; exp: NbdExport }
  | { kind: 'write-payload'; exp: NbdExport; request: Request; payload: Buffer; filled: number }
  | { kind: 'closed'; exp: NbdExport | undefined };

/** A transmission-phase request, parsed out of its header (which lives in a reused buffer). */
interface Request {
  cookieHi: number;
  cookieLo: number;
  flags: number;
  type: number;
  /** -1 when the 64-bit offset does not fit a safe integer (always out of range). */
  offset: number;
  length: number;
}

const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Above this many requests or payload bytes in flight, stop reading from the socket. */
const MAX_INFLIGHT_REQUESTS = 256;
const MAX_INFLIGHT_BYTES = 128 * 1024 * 1024;

const KNOWN_COMMAND_FLAGS = CommandFlag.FUA | CommandFlag.NO_HOLE;
const BLOCK_STATUS_FLAGS = CommandFlag.FUA | CommandFlag.REQ_ONE;

function errnoOf(err: unknown, writing: boolean): number {
  if (err instanceof ReplyErrno) return err.errno;
  if (!isLockstepError(err)) return NbdErrno.EIO;
  switch (err.code) {
    case 'LOCKSTEP_ERR_READ_ONLY':
      return NbdErrno.EPERM;
    case 'LOCKSTEP_ERR_OUT_OF_RANGE':
      return writing ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    case 'LOCKSTEP_ERR_NO_SPACE':
      return NbdErrno.ENOSPC;
    case 'LOCKSTEP_ERR_INVALID_ARGUMENT':
      return NbdErrno.EINVAL;
    case 'LOCKSTEP_ERR_UNAVAILABLE':
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}

/** Offset from the 64-bit field at `at`, or -1 if it does not fit a safe integer. */
function readOffset(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  if (hi >= 0x200000) return -1;
  return hi * 0x100000000 + buf.readUInt32BE(at + 4);
}

let nextConnectionId = 1;

export class NbdConnection {
  readonly id = nextConnectionId++;
  private phase: Phase = { kind: 'client-flags' };
  /** A protocol element split across reads, collected until complete. */
  private readonly collector = new ElementCollector();
  private noZeroes = false;
  private blockSizeNegotiated = false;
  /** The client negotiated structured replies. */
  private structured = false;
  /** The last SET_META_CONTEXT's contexts (id = index + 1) and the export it named. */
  private selected: { exportName: string; contexts: string[] } | undefined;
  /** What BLOCK_STATUS reports, by id - 1: the selection, if it named the export served. */
  private contexts: readonly string[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private inFlightBytes = 0;
  private paused = false;
  /** Replies are being gathered until the end of this turn of the event loop. */
  private corked = false;
  private disconnecting = false;
  private readonly handshakeTimer: NodeJS.Timeout;
  /** The client completed STARTTLS. */
  private secured = false;

  /** `socket` must deliver reads to `onRead`, into the buffer `readBuffer()` names. */
  constructor(
    /** Replaced by its TLS socket after STARTTLS. */
    private socket: Socket,
    /** Where reads land unless a write payload is being filled. */
    private readonly scratch: Buffer,
    private readonly catalog: ExportCatalog,
    private readonly log: ConnectionLog,
    private readonly observe: RequestObserver,
    private readonly pool: BufferPool,
    private readonly tls?: NbdTls,
  ) {
    socket.setNoDelay?.(true);
    socket.on('error', (err) =>
      this.log.debug({ conn: this.id, err: err.message }, 'nbd socket error'),
    );
    socket.on('close', () => this.onClose());
    this.handshakeTimer = setTimeout(
      () => this.protocolError('negotiation not finished in time'),
      HANDSHAKE_TIMEOUT_MS,
    );
    this.sendGreeting();
  }

  get exportName(): string | undefined {
    return this.served()?.name;
  }

  /** The export this connection chose, once it has. */
  private served(): NbdExport | undefined {
    const phase = this.phase;
    return 'exp' in phase ? phase.exp : undefined;
  }

  get requestsInFlight(): number {
    return this.inFlight.size;
  }

  // ---- input ---------------------------------------------------------------------------------

  /** The buffer the next read should fill: the rest of a pending write payload, or scratch. */
  readBuffer(): Buffer {
    const phase = this.phase;
    return phase.kind === 'write-payload' ? phase.payload.subarray(phase.filled) : this.scratch;
  }

  /** Handles `n` bytes the kernel just put into `buf` (a buffer `readBuffer()` returned). */
  onRead(n: number, buf: Buffer): void {
    if (this.phase.kind === 'closed') return;
    try {
      if (buf !== this.scratch) this.onPayloadBytes(n);
      else this.parse(buf, n);
    } catch (err) {
      this.protocolError(`internal error: ${errorMessage(err)}`);
    }
  }

  private onPayloadBytes(n: number): void {
    const phase = this.phase;
    if (phase.kind !== 'write-payload') throw new Error('payload bytes outside a write');
    phase.filled += n;
    if (phase.filled === phase.payload.length) {
      this.phase = { kind: 'request-header', exp: phase.exp };
      this.onWrite(phase.exp, phase.request, phase.payload);
    }
  }

  /** Bytes the current state needs as one element; 0 for states that stream. */
  private elementSize(): number {
    const phase = this.phase;
    switch (phase.kind) {
      case 'client-flags':
        return 4;
      case 'option-header':
        return OPTION_HEADER_BYTES;
      case 'option-data':
        return phase.length;
      case 'request-header':
        return REQUEST_HEADER_BYTES;
      case 'option-too-big':
      case 'write-payload':
      case 'closed':
        return 0;
    }
  }

  private parse(buf: Buffer, end: number): void {
    let off = 0;
    while (off < end) {
      const phase = this.phase;
      if (phase.kind === 'closed' || (phase.kind === 'request-header' && this.disconnecting))
        return;
      if (phase.kind === 'write-payload') {
        const k = Math.min(end - off, phase.payload.length - phase.filled);
        buf.copy(phase.payload, phase.filled, off, off + k);
        off += k;
        this.onPayloadBytes(k);
        continue;
      }
      if (phase.kind === 'option-too-big') {
        const k = Math.min(end - off, phase.remaining);
        phase.remaining -= k;
        off += k;
        if (phase.remaining === 0) {
          this.phase = { kind: 'option-header' };
          this.optionError(phase.option, OptionReply.ERR_TOO_BIG, 'option data too long');
        }
        continue;
      }
      // A header split across reads is copied; one inside this read is parsed in place.
      const element = this.collector.take(this.elementSize(), buf, off, end);
      off += this.collector.used;
      if (element) this.onElement(element);
    }
  }

  /** One complete element for the current state. `bytes` is only valid during this call. */
  private onElement(bytes: Buffer): void {
    const phase = this.phase;
    switch (phase.kind) {
      case 'client-flags':
        return this.onClientFlags(bytes.readUInt32BE(0));
      case 'option-header':
        return this.onOptionHeader(bytes);
      case 'option-data':
        this.phase = { kind: 'option-header' };
        return this.onOption(phase.option, bytes);
      case 'request-header':
        return this.onRequestHeader(phase.exp, bytes);
      case 'option-too-big':
      case 'write-payload':
      case 'closed':
        throw new Error(`no element in state ${phase.kind}`);
    }
  }

  // ---- negotiation ---------------------------------------------------------------------------

  private sendGreeting(): void {
    const greeting = Buffer.allocUnsafe(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16);
    this.socket.write(greeting);
  }

  private onClientFlags(flags: number): void {
    const known = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
    if (!(flags & ClientFlag.FIXED_NEWSTYLE) || flags & ~known) {
      return this.protocolError(`unsupported client flags 0x${flags.toString(16)}`);
    }
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
    this.phase = { kind: 'option-header' };
  }

  private onOptionHeader(h: Buffer): void {
    if (h.readBigUInt64BE(0) !== IHAVEOPT) return this.protocolError('bad option magic');
    const option = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    if (length === 0) {
      this.phase = { kind: 'option-header' };
      return this.onOption(option, Buffer.alloc(0));
    }
    this.phase =
      length > MAX_OPTION_BYTES
        ? { kind: 'option-too-big', option, remaining: length }
        : { kind: 'option-data', option, length: length };
  }

  private onOption(option: number, data: Buffer): void {
    if (this.tls && !this.secured && option !== Option.STARTTLS && option !== Option.ABORT) {
      // EXPORT_NAME has no error reply: the connection ends.
      if (option === Option.EXPORT_NAME)
        return this.protocolError('EXPORT_NAME before STARTTLS on a port that requires TLS');
      return this.optionError(
        option,
        OptionReply.ERR_TLS_REQD,
        'this port requires TLS: negotiate STARTTLS (with a client certificate) first',
      );
    }
    switch (option) {
      case Option.EXPORT_NAME:
        return this.onExportName(data);
      case Option.ABORT:
        this.optionReply(option, OptionReply.ACK);
        return this.close();
      case Option.LIST:
        return this.onList(data);
      case Option.INFO:
      case Option.GO:
        return this.onInfoOrGo(option, data);
      case Option.STARTTLS:
        return this.onStartTls(data);
      case Option.STRUCTURED_REPLY:
        return this.onStructuredReply(data);
      case Option.LIST_META_CONTEXT:
      case Option.SET_META_CONTEXT:
        return this.onMetaContext(option, data);
      default:
        // Extended headers are not offered: every request we take fits 32-bit lengths.
        return this.optionError(option, OptionReply.ERR_UNSUP, 'option not supported');
    }
  }

  private onStartTls(data: Buffer): void {
    if (!this.tls)
      return this.optionError(
        Option.STARTTLS,
        OptionReply.ERR_POLICY,
        'TLS is not offered on this socket',
      );
    if (this.secured)
      return this.optionError(Option.STARTTLS, OptionReply.ERR_INVALID, 'TLS is already on');
    if (data.length !== 0)
      return this.optionError(Option.STARTTLS, OptionReply.ERR_INVALID, 'STARTTLS takes no data');
    this.optionReply(Option.STARTTLS, OptionReply.ACK);
    const raw = this.socket;
    // From here the TLS socket reads the connection; what arrives is decrypted for us.
    raw.removeAllListeners('data');
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: this.tls.context(),
      requestCert: true,
      rejectUnauthorized: true,
    });
    this.socket = secure;
    secure.on('error', (err: Error) => {
      this.log.warn({ conn: this.id, err: err.message }, 'nbd TLS handshake or session failed');
      this.close(true);
    });
    secure.once('secure', () => {
      // Any certificate from the cluster's CA may use the export; nothing else.
      const client = verifiedClient(secure);
      if (typeof client === 'string') {
        this.log.warn({ conn: this.id, reason: client }, 'nbd client refused after STARTTLS');
        return this.close(true);
      }
      this.secured = true;
      this.log.debug(
        { conn: this.id, client: `${client.role} ${client.name}` },
        'nbd client upgraded to TLS',
      );
    });
    feedReads(secure, this);
  }

  private onStructuredReply(data: Buffer): void {
    if (data.length !== 0) {
      return this.optionError(
        Option.STRUCTURED_REPLY,
        OptionReply.ERR_INVALID,
        'STRUCTURED_REPLY takes no data',
      );
    }
    this.structured = true;
    this.optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK);
  }

  /** LIST_META_CONTEXT names the contexts a query matches; SET_META_CONTEXT also selects them. */
  private onMetaContext(option: number, data: Buffer): void {
    const selecting = option === Option.SET_META_CONTEXT;
    // A SET replaces the selection even when it fails.
    if (selecting) this.selected = undefined;
    if (!this.structured) {
      return this.optionError(
        option,
        OptionReply.ERR_INVALID,
        'metadata contexts need structured replies: negotiate STRUCTURED_REPLY first',
      );
    }
    const request = parseMetaContextRequest(data);
    if (typeof request === 'string')
      return this.optionError(option, OptionReply.ERR_INVALID, request);
    const exp = this.catalog.resolve(request.exportName);
    if (!('device' in exp)) return this.optionError(option, OptionReply.ERR_UNKNOWN, exp.message);
    const contexts = matchMetaContexts(exp.device.metaContexts, request.queries, selecting);
    if (typeof contexts === 'string')
      return this.optionError(option, OptionReply.ERR_INVALID, contexts);
    if (selecting && contexts.length > MAX_SELECTED_CONTEXTS) {
      return this.optionError(
        option,
        OptionReply.ERR_TOO_BIG,
        `select at most ${MAX_SELECTED_CONTEXTS} metadata contexts`,
      );
    }
    contexts.forEach((name, i) => {
      const n = Buffer.from(name, 'utf8');
      const body = Buffer.allocUnsafe(4 + n.length);
      // Listed contexts carry id 0, as the spec asks; selected ones their id.
      body.writeUInt32BE(selecting ? i + 1 : 0, 0);
      n.copy(body, 4);
      this.optionReply(option, OptionReply.META_CONTEXT, body);
    });
    if (selecting) this.selected = { exportName: exp.name, contexts };
    this.optionReply(option, OptionReply.ACK);
  }

  private onList(data: Buffer): void {
    if (data.length !== 0)
      return this.optionError(Option.LIST, OptionReply.ERR_INVALID, 'LIST takes no data');
    for (const name of this.catalog.names()) {
      const n = Buffer.from(name, 'utf8');
      const body = Buffer.allocUnsafe(4 + n.length);
      body.writeUInt32BE(n.length, 0);
      n.copy(body, 4);
      this.optionReply(Option.LIST, OptionReply.SERVER, body);
    }
    this.optionReply(Option.LIST, OptionReply.ACK);
  }

  private onInfoOrGo(option: number, data: Buffer): void {
    if (data.length < 6)
      return this.optionError(option, OptionReply.ERR_INVALID, 'request too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_NAME_BYTES || data.length < 4 + nameLength + 2) {
      return this.optionError(option, OptionReply.ERR_INVALID, 'bad export name length');
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) {
      return this.optionError(
        option,
        OptionReply.ERR_INVALID,
        'information request count does not match length',
      );
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(4 + nameLength + 2 + 2 * i));

    const exp = this.catalog.resolve(name);
    if (!('device' in exp)) return this.optionError(option, OptionReply.ERR_UNKNOWN, exp.message);

    const info = Buffer.allocUnsafe(12);
    info.writeUInt16BE(Info.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.device.size), 2);
    info.writeUInt16BE(this.transmissionFlags(exp), 10);
    this.optionReply(option, OptionReply.INFO, info);

    const sizes = Buffer.allocUnsafe(14);
    sizes.writeUInt16BE(Info.BLOCK_SIZE, 0);
    sizes.writeUInt32BE(MIN_BLOCK, 2);
    sizes.writeUInt32BE(PREFERRED_BLOCK, 6);
    sizes.writeUInt32BE(MAX_PAYLOAD, 10);
    this.optionReply(option, OptionReply.INFO, sizes);

    if (requested.has(Info.NAME)) {
      const n = Buffer.from(exp.name, 'utf8');
      const body = Buffer.allocUnsafe(2 + n.length);
      body.writeUInt16BE(Info.NAME, 0);
      n.copy(body, 2);
      this.optionReply(option, OptionReply.INFO, body);
    }
    this.optionReply(option, OptionReply.ACK);
    if (option === Option.GO) {
      this.blockSizeNegotiated = requested.has(Info.BLOCK_SIZE);
      this.startTransmission(exp);
    }
  }

  private onExportName(data: Buffer): void {
    const exp =
      data.length <= MAX_NAME_BYTES ? this.catalog.resolve(data.toString('utf8')) : undefined;
    // The spec leaves no error reply for EXPORT_NAME: an unknown export ends the connection.
    if (!exp || !('device' in exp))
      return this.protocolError(`EXPORT_NAME: ${exp?.message ?? 'name too long'}`);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    reply.writeBigUInt64BE(BigInt(exp.device.size), 0);
    reply.writeUInt16BE(this.transmissionFlags(exp), 8);
    this.socket.write(reply);
    this.startTransmission(exp);
  }

  private transmissionFlags(exp: NbdExport): number {
    // CAN_MULTI_CONN holds: every connection to an export shares one file descriptor and a
    // write is replied to only once it reached the file, so a FLUSH on any connection covers
    // every write already acknowledged on all of them.
    let flags =
      TransmissionFlag.HAS_FLAGS |
      TransmissionFlag.SEND_FLUSH |
      TransmissionFlag.SEND_FUA |
      TransmissionFlag.SEND_TRIM |
      TransmissionFlag.SEND_WRITE_ZEROES |
      TransmissionFlag.SEND_CACHE |
      TransmissionFlag.CAN_MULTI_CONN;
    if (exp.device.readOnly) flags |= TransmissionFlag.READ_ONLY;
    return flags;
  }

  private startTransmission(exp: NbdExport): void {
    clearTimeout(this.handshakeTimer);
    if (this.selected?.exportName === exp.name) this.contexts = this.selected.contexts;
    this.catalog.attach(this, exp);
    this.phase = { kind: 'request-header', exp };
  }

  private optionReply(option: number, type: number, data?: Buffer): void {
    const header = Buffer.allocUnsafe(20);
    header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data?.length ?? 0, 16);
    this.socket.write(data ? Buffer.concat([header, data]) : header);
  }

  private optionError(option: number, type: number, message: string): void {
    this.optionReply(option, type, Buffer.from(message, 'utf8'));
  }

  // ---- transmission --------------------------------------------------------------------------

  private onRequestHeader(exp: NbdExport, h: Buffer): void {
    if (h.readUInt32BE(0) !== REQUEST_MAGIC) return this.protocolError('bad request magic');
    const req: Request = {
      cookieHi: h.readUInt32BE(8),
      cookieLo: h.readUInt32BE(12),
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      offset: readOffset(h, 16),
      length: h.readUInt32BE(24),
    };
    if (req.type === Command.WRITE) {
      // The payload follows the header: one whose length we will not buffer cannot be skipped
      // safely, so the connection ends (the spec allows it for oversized requests).
      if (req.length > MAX_PAYLOAD) {
        return this.protocolError(
          `write of ${req.length} bytes exceeds the ${MAX_PAYLOAD}-byte limit`,
        );
      }
      if (req.length === 0) return this.onWrite(exp, req, Buffer.alloc(0));
      this.phase = {
        kind: 'write-payload',
        exp,
        request: req,
        payload: this.pool.acquire(req.length),
        filled: 0,
      };
      return;
    }
    if (req.type === Command.DISC) return this.onDisconnect();
    this.onCommand(exp, req);
  }

  private onCommand(exp: NbdExport, req: Request): void {
    const { flags, offset, length } = req;
    const device = exp.device;
    switch (req.type) {
      case Command.READ: {
        const bad =
          this.invalid(exp, req, false) ?? (length > MAX_PAYLOAD ? NbdErrno.EINVAL : undefined);
        if (bad !== undefined) return this.replyError(exp, req, 'read', bad);
        // The data goes after room for its reply's header: both leave in one write.
        const head = this.structured ? DATA_CHUNK_HEADER_BYTES : SIMPLE_REPLY_BYTES;
        const reply = Buffer.allocUnsafe(head + length);
        const work = device.read(offset, reply.subarray(head));
        return this.run(exp, req, 'read', length, work, reply);
      }
      case Command.FLUSH:
        if (flags & ~KNOWN_COMMAND_FLAGS)
          return this.replyError(exp, req, 'flush', NbdErrno.EINVAL);
        return this.run(exp, req, 'flush', 0, device.flush());
      case Command.TRIM: {
        const bad = this.invalid(exp, req, true);
        if (bad !== undefined) return this.replyError(exp, req, 'trim', bad);
        const work = device.trim(offset, length);
        return this.run(
          exp,
          req,
          'trim',
          length,
          flags & CommandFlag.FUA ? work.then(() => device.flush()) : work,
        );
      }
      case Command.WRITE_ZEROES: {
        const bad = this.invalid(exp, req, true);
        if (bad !== undefined) return this.replyError(exp, req, 'write_zeroes', bad);
        const opts = {
          fua: (flags & CommandFlag.FUA) !== 0,
          noHole: (flags & CommandFlag.NO_HOLE) !== 0,
        };
        return this.run(exp, req, 'write_zeroes', length, device.writeZeroes(offset, length, opts));
      }
      case Command.CACHE: {
        // A hint to prefetch; the page cache already does what it can.
        const bad = this.invalid(exp, req, false);
        return bad !== undefined
          ? this.replyError(exp, req, 'cache', bad)
          : this.run(exp, req, 'cache', 0, Promise.resolve());
      }
      case Command.BLOCK_STATUS: {
        const bad =
          this.invalid(exp, req, false, BLOCK_STATUS_FLAGS) ??
          (this.contexts.length === 0 ? NbdErrno.EINVAL : undefined);
        if (bad !== undefined) return this.replyError(exp, req, 'block_status', bad);
        return this.run(exp, req, 'block_status', 0, this.blockStatus(device, req));
      }
      default:
        return this.replyError(exp, req, 'invalid', NbdErrno.EINVAL);
    }
  }

  private onWrite(exp: NbdExport, req: Request, payload: Buffer): void {
    const bad = this.invalid(exp, req, true);
    const work =
      bad !== undefined
        ? Promise.reject(new ReplyErrno(bad))
        : exp.device.write(req.offset, payload, (req.flags & CommandFlag.FUA) !== 0);
    // The payload goes back to the pool once the device (and every replica) is done with it.
    this.run(
      exp,
      req,
      'write',
      payload.length,
      work.finally(() => this.pool.release(payload)),
    );
  }

  /** Every selected context's extents, framed as one reply once all of them are known. */
  private async blockStatus(device: BlockDevice, req: Request): Promise<Buffer> {
    const source = device.metaContexts;
    // Contexts were selected on this export's device, so it has them unless it changed since.
    if (!source) throw new ReplyErrno(NbdErrno.EINVAL);
    const reports = await Promise.all(
      this.contexts.map((name) => source.extents(name, req.offset, req.length)),
    );
    return blockStatusReply(req, reports, req.length, (req.flags & CommandFlag.REQ_ONE) !== 0);
  }

  /** The errno a request gets before it reaches the device, if any. */
  private invalid(
    exp: NbdExport,
    req: Request,
    writing: boolean,
    allowedFlags: number = KNOWN_COMMAND_FLAGS,
  ): number | undefined {
    const { flags, offset, length } = req;
    const device = exp.device;
    if (flags & ~allowedFlags) return NbdErrno.EINVAL;
    if (writing && device.readOnly) return device.leaving ? NbdErrno.ESHUTDOWN : NbdErrno.EPERM;
    if (length === 0) return NbdErrno.EINVAL;
    if (offset < 0 || offset + length > device.size) {
      return writing ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    }
    if (this.blockSizeNegotiated && (offset % MIN_BLOCK !== 0 || length % MIN_BLOCK !== 0)) {
      return NbdErrno.EINVAL;
    }
    return undefined;
  }

  /**
   * Tracks a request until its reply is sent. A read's `reply` holds its data after room for
   * the header; work that resolves to a buffer (block status) has framed the whole reply.
   */
  private run(
    exp: NbdExport,
    req: Request,
    kind: RequestKind,
    bytes: number,
    work: Promise<Buffer | void>,
    reply?: Buffer,
  ): void {
    const started = performance.now();
    const payloadBytes = kind === 'write' || kind === 'read' ? bytes : 0;
    this.inFlightBytes += payloadBytes;
    const done = work.then(
      (framed) => this.send(framed ?? this.success(req, reply)),
      (err: unknown) => {
        const errno = errnoOf(err, kind !== 'read' && kind !== 'cache' && kind !== 'block_status');
        if (errno === NbdErrno.EIO) {
          this.log.warn(
            { conn: this.id, export: exp.name, kind, err: errorMessage(err) },
            'nbd request failed',
          );
        }
        this.send(this.failure(req, errno, err));
        return errno;
      },
    );
    const tracked = done.then((errno) => {
      this.inFlight.delete(tracked);
      this.inFlightBytes -= payloadBytes;
      this.observe(exp.name, kind, bytes, (performance.now() - started) / 1000, errno ?? 0);
      this.afterRequest();
    });
    this.inFlight.add(tracked);
    if (
      !this.paused &&
      (this.inFlight.size >= MAX_INFLIGHT_REQUESTS || this.inFlightBytes >= MAX_INFLIGHT_BYTES)
    ) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private replyError(exp: NbdExport, req: Request, kind: RequestKind, errno: number): void {
    this.run(exp, req, kind, 0, Promise.reject(new ReplyErrno(errno)));
  }

  /** A success's reply, its header written in front of a read's data if there is any. */
  private success(req: Request, reply: Buffer | undefined): Buffer {
    if (reply && this.structured) {
      // One chunk carries all the data and ends the reply: the data is in hand, nothing can
      // fail any more.
      writeChunkHeader(reply, req, ReplyType.OFFSET_DATA, ReplyFlag.DONE);
      reply.writeUInt32BE(Math.floor(req.offset / 0x100000000), CHUNK_HEADER_BYTES);
      reply.writeUInt32BE(req.offset >>> 0, CHUNK_HEADER_BYTES + 4);
      return reply;
    }
    return simpleReply(req, 0, reply ?? Buffer.allocUnsafe(SIMPLE_REPLY_BYTES));
  }

  private failure(req: Request, errno: number, err: unknown): Buffer {
    if (!this.structured) return simpleReply(req, errno, Buffer.allocUnsafe(SIMPLE_REPLY_BYTES));
    const message = err instanceof ReplyErrno ? refusalMessage(errno) : errorMessage(err);
    return errorChunk(req, errno, message);
  }

  private send(reply: Buffer): void {
    if (this.phase.kind === 'closed') return;
    if (!this.corked) {
      // Replies finished in the same turn (a replica's batch of acks completes many writes at
      // once) leave in one writev instead of one write syscall each (measured: the reply
      // writes were the largest cost on a primary under 4k writes at queue depth 16).
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(reply);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  private afterRequest(): void {
    if (
      this.paused &&
      this.inFlight.size < MAX_INFLIGHT_REQUESTS / 2 &&
      this.inFlightBytes < MAX_INFLIGHT_BYTES / 2
    ) {
      this.paused = false;
      this.socket.resume();
    }
    if (this.disconnecting && this.inFlight.size === 0) this.close();
  }

  private onDisconnect(): void {
    // Requests already received are completed and answered; then the connection ends.
    this.disconnecting = true;
    if (this.inFlight.size === 0) this.close();
  }

  // ---- teardown ------------------------------------------------------------------------------

  /** Stops reading requests and resolves once every request in flight has been answered. */
  async drain(): Promise<void> {
    this.disconnecting = true;
    this.socket.pause();
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
  }

  private protocolError(reason: string): void {
    if (this.phase.kind === 'closed') return;
    this.log.warn(
      { conn: this.id, export: this.served()?.name, reason },
      'nbd protocol error; closing connection',
    );
    this.close(true);
  }

  close(abrupt = false): void {
    if (this.phase.kind === 'closed') return;
    this.phase = { kind: 'closed', exp: this.served() };
    clearTimeout(this.handshakeTimer);
    if (abrupt) this.socket.destroy();
    else this.socket.end();
  }

  private onClose(): void {
    clearTimeout(this.handshakeTimer);
    const exp = this.served();
    this.phase = { kind: 'closed', exp };
    // Detach only once the requests already handed to the device have finished: until then
    // the export is still in use, even though nobody will read the replies.
    if (exp) void this.drain().then(() => this.catalog.detach(this, exp));
  }
}

/** Fills a simple reply's header at the start of `reply` (in front of a read's data). */
function simpleReply(req: Request, errno: number, reply: Buffer): Buffer {
  reply.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  reply.writeUInt32BE(errno, 4);
  reply.writeUInt32BE(req.cookieHi, 8); // the client's cookie, echoed
  reply.writeUInt32BE(req.cookieLo, 12);
  return reply;
}

/** What a structured error chunk tells a human about a request refused before the device. */
function refusalMessage(errno: number): string {
  switch (errno) {
    case NbdErrno.EPERM:
      return 'the export is read-only';
    case NbdErrno.ENOSPC:
      return 'the request goes past the end of the export';
    default:
      return (
        'invalid request: unknown command or flag, bad offset or length, ' +
        'or BLOCK_STATUS without a selected metadata context'
      );
  }
}

/** A request refused before it reached the device, carrying the errno to reply with. */
class ReplyErrno extends Error {
  constructor(readonly errno: number) {
    super(`nbd errno ${errno}`);
  }
}
