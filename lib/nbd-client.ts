// A small NBD client (fixed-newstyle negotiation, NBD_OPT_GO, simple replies) for product code
// that needs to put bytes on a volume and read them back, such as `lockstep demo`.
//
// One explicit state machine parses everything the server sends, negotiation included, so a
// message split across socket reads is just a state that is not finished yet. Requests are
// pipelined: each carries a cookie, and replies are matched by cookie in whatever order they
// come. The wire constants are spelled out here rather than shared with the server, so that a
// wrong constant cannot agree with itself; interoperability is checked against qemu-io.
import net from 'node:net';
import { LockstepError, errorMessage } from './errors';
import { ElementCollector } from './element-collector';

export type NbdTarget = { socketPath: string } | { host: string; port: number };

export interface NbdConnectOptions {
  /** Bounds the handshake and every request; on expiry the connection is torn down. */
  timeoutMs?: number;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

const HANDSHAKE_FIXED_NEWSTYLE = 1;
const HANDSHAKE_NO_ZEROES = 2;

const OPT_ABORT = 2;
const OPT_GO = 7;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR_BIT = 2 ** 31;
const REP_ERR_UNSUP = REP_ERR_BIT + 1;
const REP_ERR_UNKNOWN = REP_ERR_BIT + 6;

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

const FLAG_HAS_FLAGS = 1 << 0;
const FLAG_READ_ONLY = 1 << 1;
const FLAG_SEND_FLUSH = 1 << 2;
const FLAG_SEND_FUA = 1 << 3;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_FLAG_FUA = 1 << 0;

const GREETING_BYTES = 18;
const OPTION_REPLY_HEADER_BYTES = 20;
const REQUEST_HEADER_BYTES = 28;
const SIMPLE_REPLY_BYTES = 16;

/** What the spec tells clients to assume when the server states no maximum. */
const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** A negotiation reply longer than this is not one we asked for; refuse to buffer it. */
const MAX_OPTION_REPLY_BYTES = 1024 * 1024;
/** The request length field is 32 bits. */
const MAX_REQUEST_LENGTH = 0xffffffff;
/** How long close() waits for the server to hang up after NBD_CMD_DISC, without a timeoutMs. */
const DEFAULT_CLOSE_GRACE_MS = 10_000;

const ERRNO_NAMES: Record<number, [string, string]> = {
  1: ['EPERM', 'operation not permitted (read-only export?)'],
  5: ['EIO', 'input/output error'],
  12: ['ENOMEM', 'out of memory'],
  22: ['EINVAL', 'invalid argument'],
  28: ['ENOSPC', 'no space left on device (past the end of the export?)'],
  75: ['EOVERFLOW', 'value too large'],
  95: ['ENOTSUP', 'operation not supported'],
  108: ['ESHUTDOWN', 'server is shutting down'],
};

/** A request the server answered with an error; `errno` is the number from the reply. */
export class NbdRequestError extends Error {
  /** The errno's symbolic name, e.g. 'EPERM', or 'E<n>' for numbers this client does not know. */
  readonly code: string;

  constructor(
    readonly errno: number,
    command: string,
    offset: number,
    length: number,
  ) {
    const [name, text] = ERRNO_NAMES[errno] ?? [`E${errno}`, 'unknown error'];
    const what =
      command === 'flush' ? 'NBD flush' : `NBD ${command} of ${length} bytes at offset ${offset}`;
    super(`${what} failed: ${name} (${errno}): ${text}`);
    this.name = 'NbdRequestError';
    this.code = name;
  }
}

type ParseState =
  | { kind: 'greeting' }
  | { kind: 'option-reply-header' }
  | { kind: 'option-reply-data'; type: number; length: number }
  | { kind: 'reply-header' }
  | { kind: 'read-data'; request: Pending; into: Buffer; filled: number }
  | { kind: 'closed' };

interface Pending {
  cookie: number;
  command: 'read' | 'write' | 'flush';
  offset: number;
  length: number;
  /** Where a read's data goes. */
  into: Buffer | undefined;
  resolve(): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

function describeTarget(target: NbdTarget): string {
  return 'socketPath' in target ? target.socketPath : `${target.host}:${target.port}`;
}

function checkRange(offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `bad NBD offset ${offset}`);
  }
  if (!Number.isSafeInteger(length) || length < 0 || !Number.isSafeInteger(offset + length)) {
    throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `bad NBD length ${length}`);
  }
}

export class NbdClient {
  private state: ParseState = { kind: 'greeting' };
  /** A fixed-size element split across socket reads, collected until complete. */
  private readonly collector = new ElementCollector();
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  /** Set once the connection is unusable; later calls reject with it. */
  private failure: LockstepError | undefined;
  private closing = false;
  private closePromise: Promise<void> | undefined;
  private readonly socketClosed: Promise<void>;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private handshake: { resolve(): void; reject(err: Error): void } | undefined;

  private exportSize = 0;
  private transmissionFlags = 0;
  private sizes: NbdBlockSize = { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD };
  private sawExportInfo = false;

  private constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
    private readonly exportName: string,
    private readonly timeoutMs: number | undefined,
  ) {
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) =>
      this.fail(`NBD connection to ${where} failed: ${err.message}`, err),
    );
    socket.on('close', () => this.fail(`NBD connection to ${where} closed`));
  }

  static async connect(
    target: NbdTarget,
    exportName: string,
    opts: NbdConnectOptions = {},
  ): Promise<NbdClient> {
    if (Buffer.byteLength(exportName, 'utf8') > 4096) {
      throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', 'NBD export name too long');
    }
    const socket =
      'socketPath' in target
        ? net.connect(target.socketPath)
        : net.connect({ host: target.host, port: target.port });
    socket.setNoDelay(true);
    const client = new NbdClient(socket, describeTarget(target), exportName, opts.timeoutMs);
    await new Promise<void>((resolve, reject) => {
      client.handshake = { resolve, reject };
      if (opts.timeoutMs !== undefined) {
        client.handshakeTimer = setTimeout(
          () => client.fail(`NBD handshake with ${client.where} took over ${opts.timeoutMs} ms`),
          opts.timeoutMs,
        );
      }
    });
    return client;
  }

  get size(): number {
    return this.exportSize;
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & FLAG_READ_ONLY) !== 0;
  }

  get canFlush(): boolean {
    return (this.transmissionFlags & FLAG_SEND_FLUSH) !== 0;
  }

  get canFua(): boolean {
    return (this.transmissionFlags & FLAG_SEND_FUA) !== 0;
  }

  get blockSize(): NbdBlockSize {
    return { ...this.sizes };
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Writes `data` at `offset`. `data` is sent as it is when the socket drains, so it must not
   * change until the promise settles.
   */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkUsable();
    checkRange(offset, data.length);
    const fua = opts.fua === true;
    // Without FUA support, a flush after the write gives the same guarantee.
    const flag = fua && this.canFua ? CMD_FLAG_FUA : 0;
    const chunks: Promise<void>[] = [];
    const max = this.maxRequestBytes();
    for (let at = 0; at < data.length; at += max) {
      const piece = data.subarray(at, Math.min(at + max, data.length));
      chunks.push(this.submit('write', CMD_WRITE, flag, offset + at, piece.length, piece));
    }
    await Promise.all(chunks);
    if (fua && !this.canFua && this.canFlush) await this.flush();
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.checkUsable();
    checkRange(offset, length);
    const out = Buffer.allocUnsafe(length);
    const chunks: Promise<void>[] = [];
    const max = this.maxRequestBytes();
    for (let at = 0; at < length; at += max) {
      const n = Math.min(max, length - at);
      chunks.push(
        this.submit('read', CMD_READ, 0, offset + at, n, undefined, out.subarray(at, at + n)),
      );
    }
    await Promise.all(chunks);
    return out;
  }

  /** Makes every write already acknowledged durable. */
  async flush(): Promise<void> {
    this.checkUsable();
    // The spec forbids FLUSH unless offered; a server that offers none keeps no volatile cache.
    if (!this.canFlush) return;
    await this.submit('flush', CMD_FLUSH, 0, 0, 0);
  }

  /**
   * Lets requests in flight finish, then sends NBD_CMD_DISC and ends the connection. New
   * requests are refused from the moment it is called. Never rejects.
   */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.closePromise = (async () => {
      this.maybeDisconnect();
      await this.socketClosed;
    })();
    return this.closePromise;
  }

  // ---- requests ------------------------------------------------------------------------------

  private checkUsable(): void {
    if (this.failure) throw this.failure;
    if (this.closing) {
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `NBD connection to ${this.where} is closing`,
      );
    }
  }

  private maxRequestBytes(): number {
    return Math.min(this.sizes.maximum, MAX_REQUEST_LENGTH);
  }

  private submit(
    command: Pending['command'],
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    into?: Buffer,
  ): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const cookie = this.nextCookie++;
      const request: Pending = {
        cookie,
        command,
        offset,
        length,
        into,
        resolve,
        reject,
        timer: undefined,
      };
      if (this.timeoutMs !== undefined) {
        const ms = this.timeoutMs;
        request.timer = setTimeout(() => {
          // The reply may still come, but the stream can no longer be trusted to be live: give
          // up on the whole connection so no caller waits forever.
          this.fail(`NBD ${command} at offset ${offset} got no reply within ${ms} ms`);
        }, ms);
      }
      this.pending.set(cookie, request);
      const header = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
      header.writeUInt32BE(REQUEST_MAGIC, 0);
      header.writeUInt16BE(flags, 4);
      header.writeUInt16BE(type, 6);
      header.writeUInt32BE(Math.floor(cookie / 0x100000000), 8);
      header.writeUInt32BE(cookie >>> 0, 12);
      header.writeUInt32BE(Math.floor(offset / 0x100000000), 16);
      header.writeUInt32BE(offset >>> 0, 20);
      header.writeUInt32BE(length, 24);
      if (payload && payload.length > 0) {
        // One segment on the wire for header and payload, without copying the payload.
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(payload);
        this.socket.uncork();
      } else {
        this.socket.write(header);
      }
    });
  }

  private settle(request: Pending, err?: Error): void {
    this.pending.delete(request.cookie);
    clearTimeout(request.timer);
    if (err) request.reject(err);
    else request.resolve();
    this.maybeDisconnect();
  }

  private maybeDisconnect(): void {
    if (!this.closing || this.pending.size > 0 || this.state.kind === 'closed') return;
    const header = Buffer.alloc(REQUEST_HEADER_BYTES);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(CMD_DISC, 6);
    this.state = { kind: 'closed' };
    this.failure = new LockstepError(
      'LOCKSTEP_ERR_UNAVAILABLE',
      `NBD connection to ${this.where} was closed`,
    );
    this.socket.end(header);
    const grace = setTimeout(() => this.socket.destroy(), this.timeoutMs ?? DEFAULT_CLOSE_GRACE_MS);
    grace.unref();
    void this.socketClosed.then(() => clearTimeout(grace));
  }

  /** Ends the connection: every request still waiting, and every later one, rejects. */
  private fail(message: string, cause?: unknown): void {
    if (this.state.kind === 'closed') return;
    this.state = { kind: 'closed' };
    const err = new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', message, { cause });
    this.failure = err;
    clearTimeout(this.handshakeTimer);
    this.socket.destroy();
    this.handshake?.reject(err);
    this.handshake = undefined;
    const requests = [...this.pending.values()];
    this.pending.clear();
    for (const r of requests) {
      clearTimeout(r.timer);
      r.reject(err);
    }
  }

  // ---- parsing -------------------------------------------------------------------------------

  /** Bytes the current state needs as one element; 0 for states that stream or take nothing. */
  private elementSize(): number {
    const state = this.state;
    switch (state.kind) {
      case 'greeting':
        return GREETING_BYTES;
      case 'option-reply-header':
        return OPTION_REPLY_HEADER_BYTES;
      case 'option-reply-data':
        return state.length;
      case 'reply-header':
        return SIMPLE_REPLY_BYTES;
      case 'read-data':
      case 'closed':
        return 0;
    }
  }

  private onData(chunk: Buffer): void {
    try {
      this.parse(chunk);
    } catch (err) {
      this.fail(`NBD client error on ${this.where}: ${errorMessage(err)}`, err);
    }
  }

  private parse(chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      const state = this.state;
      if (state.kind === 'closed') return;
      if (state.kind === 'read-data') {
        const into = state.into;
        const k = Math.min(chunk.length - off, into.length - state.filled);
        chunk.copy(into, state.filled, off, off + k);
        state.filled += k;
        off += k;
        if (state.filled === into.length) this.onReadComplete(state.request);
        continue;
      }
      const element = this.collector.take(this.elementSize(), chunk, off, chunk.length);
      off += this.collector.used;
      if (element) this.onElement(element);
    }
  }

  /** One complete element for the current state; `bytes` is only valid during the call. */
  private onElement(bytes: Buffer): void {
    const state = this.state;
    switch (state.kind) {
      case 'greeting':
        return this.onGreeting(bytes);
      case 'option-reply-header':
        return this.onOptionReplyHeader(bytes);
      case 'option-reply-data':
        this.state = { kind: 'option-reply-header' };
        return this.onOptionReply(state.type, bytes);
      case 'reply-header':
        return this.onReplyHeader(bytes);
      case 'read-data':
      case 'closed':
        throw new Error(`no element expected in state ${state.kind}`);
    }
  }

  private protocolError(what: string): void {
    this.fail(`NBD protocol error from ${this.where}: ${what}`);
  }

  // ---- negotiation ---------------------------------------------------------------------------

  private onGreeting(g: Buffer): void {
    if (g.readBigUInt64BE(0) !== NBDMAGIC) return this.protocolError('not an NBD server');
    if (g.readBigUInt64BE(8) !== IHAVEOPT) {
      return this.protocolError('server does not speak newstyle negotiation');
    }
    const serverFlags = g.readUInt16BE(16);
    if (!(serverFlags & HANDSHAKE_FIXED_NEWSTYLE)) {
      return this.protocolError('server does not speak fixed-newstyle negotiation');
    }
    // The spec forbids a flag the server did not offer.
    const clientFlags = HANDSHAKE_FIXED_NEWSTYLE | (serverFlags & HANDSHAKE_NO_ZEROES);
    const flags = Buffer.allocUnsafe(4);
    flags.writeUInt32BE(clientFlags, 0);

    const name = Buffer.from(this.exportName, 'utf8');
    const data = Buffer.allocUnsafe(4 + name.length + 2 + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(1, 4 + name.length);
    data.writeUInt16BE(INFO_BLOCK_SIZE, 6 + name.length);
    this.socket.write(Buffer.concat([flags, this.optionHeader(OPT_GO, data.length), data]));
    this.state = { kind: 'option-reply-header' };
  }

  private optionHeader(option: number, length: number): Buffer {
    const h = Buffer.allocUnsafe(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(length, 12);
    return h;
  }

  private onOptionReplyHeader(h: Buffer): void {
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC)
      return this.protocolError('bad option reply magic');
    const option = h.readUInt32BE(8);
    if (option !== OPT_GO)
      return this.protocolError(`reply to option ${option}, which was not sent`);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY_BYTES) {
      return this.protocolError(`option reply of ${length} bytes`);
    }
    if (length === 0) return this.onOptionReply(type, Buffer.alloc(0));
    this.state = { kind: 'option-reply-data', type, length };
  }

  private onOptionReply(type: number, data: Buffer): void {
    if (type === REP_INFO) return this.onInfo(data);
    if (type === REP_ACK) {
      if (!this.sawExportInfo)
        return this.protocolError('NBD_OPT_GO acknowledged without export size');
      clearTimeout(this.handshakeTimer);
      this.state = { kind: 'reply-header' };
      this.handshake?.resolve();
      this.handshake = undefined;
      return;
    }
    if (type >= REP_ERR_BIT) return this.onOptionError(type, data.toString('utf8'));
    this.protocolError(`unexpected reply type ${type} to NBD_OPT_GO`);
  }

  private onInfo(data: Buffer): void {
    if (data.length < 2) return this.protocolError('empty NBD_REP_INFO');
    const info = data.readUInt16BE(0);
    if (info === INFO_EXPORT) {
      if (data.length !== 12) return this.protocolError('bad NBD_INFO_EXPORT length');
      const size = data.readBigUInt64BE(2);
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
        return this.protocolError(`export size ${size} is too large`);
      }
      this.exportSize = Number(size);
      const flags = data.readUInt16BE(10);
      this.transmissionFlags = flags & FLAG_HAS_FLAGS ? flags : 0;
      this.sawExportInfo = true;
    } else if (info === INFO_BLOCK_SIZE) {
      if (data.length !== 14) return this.protocolError('bad NBD_INFO_BLOCK_SIZE length');
      const minimum = data.readUInt32BE(2);
      const preferred = data.readUInt32BE(6);
      const maximum = data.readUInt32BE(10);
      if (minimum < 1 || maximum < minimum) {
        return this.protocolError(`bad block sizes ${minimum}/${preferred}/${maximum}`);
      }
      this.sizes = { minimum, preferred, maximum };
    }
    // Other information (name, description) is not needed; the spec lets clients ignore it.
  }

  private onOptionError(type: number, message: string): void {
    const detail = message ? `: ${message}` : '';
    let err: LockstepError;
    if (type === REP_ERR_UNKNOWN) {
      err = new LockstepError(
        'LOCKSTEP_ERR_VOLUME_NOT_FOUND',
        `NBD server ${this.where} has no export '${this.exportName}'${detail}`,
      );
    } else if (type === REP_ERR_UNSUP) {
      err = new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `NBD server ${this.where} does not support NBD_OPT_GO${detail}`,
      );
    } else {
      const code = `0x${type.toString(16)}`;
      err = new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `NBD server ${this.where} refused export '${this.exportName}' (error ${code})${detail}`,
      );
    }
    // Abort politely so the server does not log a dropped connection, then give up.
    this.state = { kind: 'closed' };
    this.failure = err;
    clearTimeout(this.handshakeTimer);
    this.socket.end(this.optionHeader(OPT_ABORT, 0));
    this.handshake?.reject(err);
    this.handshake = undefined;
  }

  // ---- transmission --------------------------------------------------------------------------

  private onReplyHeader(h: Buffer): void {
    if (h.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
      return this.protocolError(`bad reply magic 0x${h.readUInt32BE(0).toString(16)}`);
    }
    const errno = h.readUInt32BE(4);
    const cookie = h.readUInt32BE(8) * 0x100000000 + h.readUInt32BE(12);
    const request = this.pending.get(cookie);
    if (!request) return this.protocolError(`reply to unknown cookie ${cookie}`);
    if (errno !== 0) {
      const err = new NbdRequestError(errno, request.command, request.offset, request.length);
      return this.settle(request, err);
    }
    if (request.into && request.into.length > 0) {
      this.state = { kind: 'read-data', request, into: request.into, filled: 0 };
      return;
    }
    this.settle(request);
  }

  private onReadComplete(request: Pending): void {
    this.state = { kind: 'reply-header' };
    this.settle(request);
  }
}
