import {
  ACK_BYTES,
  FrameError,
  HELLO_BYTES,
  MAX_WRITE_BYTES,
  OP_HEADER_BYTES,
  OpFlag,
  OpHeader,
  OpKind,
  REPLY_BYTES,
  decodeHello,
  decodeReplyHeader,
  encodeHello,
  encodeReply,
  helloNameLength,
  readAckErrno,
  readAckSeq,
  writeAck,
  writeOpHeader,
} from '../../sidecar/src/replication/frames';
import { FlushBarrier } from '../../sidecar/src/replication/flush-barrier';

const token = '0123456789abcdef0123456789abcdef';

describe('replication frames', () => {
  it('round-trips op headers, 64-bit fields included, into a reused object', () => {
    const buf = Buffer.alloc(OP_HEADER_BYTES * 2);
    writeOpHeader(buf, 0, OpKind.WRITE, OpFlag.FUA, 4096, 2 ** 33 + 5, 2 ** 40, 2 ** 35 + 3);
    writeOpHeader(buf, OP_HEADER_BYTES, OpKind.FLUSH, 0, 0, 7, 0, 9);
    const h = new OpHeader();
    expect({ ...h.parse(buf, 0) }).toEqual({
      kind: OpKind.WRITE,
      fua: true,
      bulk: false,
      ordered: false,
      length: 4096,
      seq: 2 ** 33 + 5,
      offset: 2 ** 40,
      epoch: 2 ** 35 + 3,
    });
    expect(h.parse(buf, OP_HEADER_BYTES)).toBe(h);
    expect(h).toMatchObject({ kind: OpKind.FLUSH, fua: false, bulk: false, seq: 7, epoch: 9 });
    // Flag bits a later version may add are ignored, not refused.
    writeOpHeader(buf, 0, OpKind.WRITE, OpFlag.BULK | OpFlag.ORDERED | 0x80, 65536, 8, 0, 0);
    expect(h.parse(buf, 0)).toMatchObject({
      kind: OpKind.WRITE,
      fua: false,
      bulk: true,
      ordered: true,
    });
  });

  it('rejects unknown kinds, oversized writes and unsafe 64-bit values', () => {
    const buf = Buffer.alloc(OP_HEADER_BYTES);
    const h = new OpHeader();
    writeOpHeader(buf, 0, OpKind.WRITE, 0, MAX_WRITE_BYTES + 1, 1, 0, 0);
    expect(() => h.parse(buf, 0)).toThrow(/exceeds the .*-byte cap/);
    writeOpHeader(buf, 0, OpKind.ZERO, 0, 0xffffffff, 1, 0, 0);
    expect(h.parse(buf, 0).length).toBe(0xffffffff); // a zero range has no payload to cap
    buf[0] = 9;
    expect(() => h.parse(buf, 0)).toThrow(/unknown op kind 9/);
    writeOpHeader(buf, 0, OpKind.PING, 0, 0, 1, 0, 0);
    buf.writeUInt32BE(0xffffffff, 8);
    expect(() => h.parse(buf, 0)).toThrow(FrameError);
  });

  it('round-trips acks', () => {
    const buf = Buffer.alloc(ACK_BYTES);
    writeAck(buf, 0, 2 ** 40, 5);
    expect(readAckSeq(buf, 0)).toBe(2 ** 40);
    expect(readAckErrno(buf, 0)).toBe(5);
    buf[0] = 1;
    expect(() => readAckSeq(buf, 0)).toThrow(/unknown ack kind/);
  });

  it('round-trips a hello and checks magic, version, name and lane', () => {
    const hello = { lane: 3, keepaliveMs: 500, token, epoch: 2 ** 40 + 7, volume: 'vol-1' };
    const raw = encodeHello(hello);
    expect(raw.length).toBe(HELLO_BYTES + 5);
    expect(helloNameLength(raw)).toBe(5);
    expect(decodeHello(raw)).toEqual(hello);
    const bad = Buffer.from(raw);
    bad.writeUInt32BE(0x47455420, 0); // "GET "
    expect(() => helloNameLength(bad)).toThrow(/bad hello magic/);
    const v2 = Buffer.from(raw);
    v2.writeUInt16BE(1, 4);
    expect(() => helloNameLength(v2)).toThrow(
      /unsupported protocol version 1 \(this agent speaks 2/,
    );
    const lane = Buffer.from(raw);
    lane.writeUInt16BE(999, 6);
    expect(() => decodeHello(lane)).toThrow(/lane 999 out of range/);
    expect(() => encodeHello({ ...hello, token: 'nope' })).toThrow(/token/);
  });

  it('round-trips a reply with its reason', () => {
    const raw = encodeReply(1, 'stale token');
    expect(decodeReplyHeader(raw)).toEqual([1, 11]);
    expect(raw.toString('utf8', REPLY_BYTES)).toBe('stale token');
    expect(() => decodeReplyHeader(Buffer.alloc(REPLY_BYTES))).toThrow(/magic/);
  });
});

describe('FlushBarrier', () => {
  it('waits for every op begun before it, however they finish', async () => {
    const b = new FlushBarrier();
    await b.barrier(); // nothing running
    const e1 = b.begin();
    const e2 = b.begin();
    let first = false;
    const f1 = b.barrier().then(() => (first = true));
    const e3 = b.begin(); // after the barrier: not waited for
    let second = false;
    const f2 = b.barrier().then(() => (second = true));
    b.end(e2);
    await Promise.resolve();
    expect(first).toBe(false);
    b.end(e1);
    await f1;
    expect(second).toBe(false);
    b.end(e3);
    await f2;
    expect(first && second).toBe(true);
  });
});
