import {
  decodeAcks,
  decodeOps,
  encodeAcks,
  encodeOps,
  FrameError,
  OpKind,
  type Op,
} from '../../sidecar/src/replication/frames';

describe('replication frames', () => {
  it('round-trips a batch of writes, zeroes and flushes, with write data as views', () => {
    const ops: Op[] = [
      { kind: OpKind.WRITE, fua: false, seq: 1, offset: 4096, length: 3, data: Buffer.from('abc') },
      { kind: OpKind.ZERO, fua: true, seq: 2, offset: 2 ** 40, length: 65536 },
      { kind: OpKind.FLUSH, fua: false, seq: 2 ** 33 + 5, offset: 0, length: 0 },
      { kind: OpKind.WRITE, fua: true, seq: 4, offset: 0, length: 1, data: Buffer.from('z') },
    ];
    const msg = encodeOps(ops);
    const back = decodeOps(msg);
    expect(back.map(({ data, ...rest }) => ({ ...rest, data: data?.toString() }))).toEqual(
      ops.map(({ data, ...rest }) => ({ ...rest, data: data?.toString() })),
    );
    expect(back[0].data!.buffer).toBe(msg.buffer);
  });

  it('rejects truncated and unknown records', () => {
    const msg = encodeOps([
      { kind: OpKind.WRITE, fua: false, seq: 1, offset: 0, length: 4, data: Buffer.from('abcd') },
    ]);
    expect(() => decodeOps(msg.subarray(0, msg.length - 1))).toThrow(FrameError);
    expect(() => decodeOps(msg.subarray(0, 10))).toThrow(/truncated op header/);
    const bad = Buffer.from(msg);
    bad[0] = 9;
    expect(() => decodeOps(bad)).toThrow(/unknown op kind 9/);
  });

  it('round-trips acks and rejects a length mismatch', () => {
    const acks = [
      { seq: 1, errno: 0 },
      { seq: 2 ** 40, errno: 5 },
    ];
    expect(decodeAcks(encodeAcks(acks))).toEqual(acks);
    expect(() => decodeAcks(encodeAcks(acks).subarray(0, 20))).toThrow(FrameError);
  });
});
