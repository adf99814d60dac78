// A deliberately minimal NBD client over a raw socket, for sending what real clients never
// send: bad magics, truncated headers, oversized lengths, unknown commands.
import net from 'node:net';

export const NBD = {
  IHAVEOPT: 0x49484156454f5054n,
  REQUEST_MAGIC: 0x25609513,
  REPLY_MAGIC: 0x67446698,
  STRUCTURED_REPLY_MAGIC: 0x668e33ef,
  OPT_EXPORT_NAME: 1,
  OPT_GO: 7,
  OPT_LIST: 3,
  OPT_STARTTLS: 5,
  OPT_STRUCTURED_REPLY: 8,
  OPT_LIST_META_CONTEXT: 9,
  OPT_SET_META_CONTEXT: 10,
  REP_ACK: 1,
  REP_META_CONTEXT: 4,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  CMD_READ: 0,
  CMD_WRITE: 1,
  CMD_DISC: 2,
  CMD_FLUSH: 3,
  CMD_BLOCK_STATUS: 7,
  FLAG_DF: 1 << 2,
  FLAG_REQ_ONE: 1 << 3,
  REPLY_FLAG_DONE: 1,
  REPLY_TYPE_NONE: 0,
  REPLY_TYPE_OFFSET_DATA: 1,
  REPLY_TYPE_BLOCK_STATUS: 5,
  REPLY_TYPE_ERROR: 2 ** 15 + 1,
  EPERM: 1,
  EIO: 5,
  EINVAL: 22,
  ENOSPC: 28,
} as const;

/** One structured reply chunk, its payload undecoded. */
export interface Chunk {
  flags: number;
  type: number;
  cookie: number;
  payload: Buffer;
}

export class RawNbd {
  private buffered = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, c]);
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    socket.on('error', () => {});
  }

  /** To a unix socket path, or a TCP port on 127.0.0.1. */
  static connect(where: string | number): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s =
        typeof where === 'number'
          ? net.connect(where, '127.0.0.1', () => resolve(new RawNbd(s)))
          : net.connect(where, () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  /** Resolves with exactly n bytes, or rejects if the server closes first. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered.length < n) {
      if (this.closed)
        throw new Error(
          `connection closed by server (wanted ${n} bytes, had ${this.buffered.length})`,
        );
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
        setTimeout(resolve, 50);
      });
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }

  /** Resolves true once the server has closed the connection (within the timeout). */
  async closedByServer(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Reads the greeting and sends client flags (FIXED_NEWSTYLE | NO_ZEROES by default). */
  async greet(clientFlags = 3): Promise<void> {
    const g = await this.read(18);
    if (g.toString('latin1', 0, 8) !== 'NBDMAGIC') throw new Error('bad greeting');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags);
    this.write(f);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), magic: bigint = NBD.IHAVEOPT): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const length = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(length) };
  }

  /** OPT_GO to `name`; resolves with the final reply type (ACK = 1 on success). */
  async go(name: string): Promise<{ type: number; message: string }> {
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    this.sendOption(NBD.OPT_GO, d);
    for (;;) {
      const r = await this.readOptionReply();
      if (r.type !== 3) return { type: r.type, message: r.data.toString() };
    }
  }

  /** LIST_META_CONTEXT or SET_META_CONTEXT: the contexts replied (id, name), then the final type. */
  async metaContext(
    option: number,
    exportName: string,
    queries: string[],
  ): Promise<{ contexts: { id: number; name: string }[]; type: number; message: string }> {
    const strings = [exportName, ...queries].map((s) => {
      const b = Buffer.from(s);
      const length = Buffer.alloc(4);
      length.writeUInt32BE(b.length);
      return Buffer.concat([length, b]);
    });
    const count = Buffer.alloc(4);
    count.writeUInt32BE(queries.length);
    this.sendOption(option, Buffer.concat([strings[0], count, ...strings.slice(1)]));
    const contexts: { id: number; name: string }[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      if (r.type !== NBD.REP_META_CONTEXT)
        return { contexts, type: r.type, message: r.data.toString() };
      contexts.push({ id: r.data.readUInt32BE(0), name: r.data.toString('utf8', 4) });
    }
  }

  static async open(socketPath: string, name: string): Promise<RawNbd> {
    const c = await RawNbd.connect(socketPath);
    await c.greet();
    const r = await c.go(name);
    if (r.type !== 1) throw new Error(`GO ${name} failed: ${r.type} ${r.message}`);
    return c;
  }

  request(
    type: number,
    offset: number,
    length: number,
    opts: { flags?: number; cookie?: number; payload?: Buffer; magic?: number } = {},
  ): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(opts.magic ?? NBD.REQUEST_MAGIC, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(opts.cookie ?? 1), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
  }

  async reply(dataLength = 0): Promise<{ error: number; cookie: number; data: Buffer }> {
    const h = await this.read(16);
    if (h.readUInt32BE(0) !== NBD.REPLY_MAGIC) throw new Error('bad reply magic');
    const error = h.readUInt32BE(4);
    return {
      error,
      cookie: Number(h.readBigUInt64BE(8)),
      data: error === 0 && dataLength ? await this.read(dataLength) : Buffer.alloc(0),
    };
  }

  /** The next structured reply chunk. */
  async chunk(): Promise<Chunk> {
    const h = await this.read(20);
    if (h.readUInt32BE(0) !== NBD.STRUCTURED_REPLY_MAGIC) throw new Error('bad chunk magic');
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: Number(h.readBigUInt64BE(8)),
      payload: await this.read(h.readUInt32BE(16)),
    };
  }

  destroy(): void {
    this.socket.destroy();
  }
}
