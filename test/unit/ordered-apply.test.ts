// A secondary applies ORDERED ops (async mode) one after another in the order they arrived,
// and other ops as soon as they arrive: driven over a real TCP connection to a real data
// listener, with a device that completes writes only when the test says so.
import { PLAINTEXT } from '../../lib/tls/transport';
import net from 'node:net';
import { createLogger } from '../../lib/logger';
import { DataListener } from '../../sidecar/src/replication/data-listener';
import {
  ACK_BYTES,
  OP_HEADER_BYTES,
  OpFlag,
  OpKind,
  REPLY_BYTES,
  encodeHello,
  writeOpHeader,
} from '../../sidecar/src/replication/frames';
import type { FileBlockDevice } from '../../sidecar/src/store/file-device';

const token = '00112233445566778899aabbccddeeff';

/** Records writes; each completes when the test resolves it. */
class HeldDevice {
  readonly started: number[] = [];
  private readonly finish = new Map<number, () => void>();
  write(offset: number): Promise<void> {
    this.started.push(offset);
    return new Promise((resolve) => this.finish.set(offset, resolve));
  }
  complete(offset: number): void {
    this.finish.get(offset)!();
  }
  tryAlignedBuffer(): undefined {
    return undefined;
  }
  releaseAlignedBuffer(): boolean {
    return false;
  }
}

const silentLog = createLogger('test');
silentLog.level = 'silent';

const tick = () => new Promise((r) => setTimeout(r, 20));

describe('ordered apply on a secondary', () => {
  let listener: DataListener;
  let device: HeldDevice;
  let client: net.Socket;
  let received: Buffer;

  beforeEach(async () => {
    device = new HeldDevice();
    listener = await DataListener.listen(
      '127.0.0.1',
      0,
      () => ({
        device: device as unknown as FileBlockDevice,
        epoch: 0,
        received: () => undefined,
        detach: () => undefined,
      }),
      silentLog,
      PLAINTEXT,
      () => undefined,
    );
    const [host, port] = listener.address.split(':');
    client = net.connect({ host, port: Number(port) });
    received = Buffer.alloc(0);
    client.on('data', (c: Buffer) => (received = Buffer.concat([received, c])));
    client.write(encodeHello({ lane: 0, keepaliveMs: 1000, token, epoch: 0, volume: 'v' }));
    while (received.length < REPLY_BYTES) await tick();
    expect(received.readUInt16BE(6)).toBe(0); // accepted
    received = Buffer.alloc(0);
  });
  afterEach(async () => {
    client.destroy();
    await listener.close();
  });

  function sendWrite(seq: number, offset: number, length: number, flags: number): void {
    const h = Buffer.alloc(OP_HEADER_BYTES);
    writeOpHeader(h, 0, OpKind.WRITE, flags, length, seq, offset, 0);
    client.write(Buffer.concat([h, Buffer.alloc(length, seq)]));
  }

  /**
   * The writes started once `n` have (the bytes cross a real socket: on a busy machine that
   * takes more than a tick), and a tick later, so that one started too many shows too.
   */
  async function startedOnce(n: number): Promise<number[]> {
    for (let i = 0; i < 250 && device.started.length < n; i++) await tick();
    await tick();
    return [...device.started];
  }

  it('applies ORDERED writes one after another, in arrival order', async () => {
    sendWrite(1, 0, 1 << 20, OpFlag.ORDERED);
    sendWrite(2, 4 << 20, 4096, OpFlag.ORDERED);
    sendWrite(3, 8 << 20, 4096, OpFlag.ORDERED);
    expect(await startedOnce(1)).toEqual([0]); // the later ones wait, small as they are
    device.complete(0);
    expect(await startedOnce(2)).toEqual([0, 4 << 20]);
    device.complete(4 << 20);
    expect(await startedOnce(3)).toEqual([0, 4 << 20, 8 << 20]);
    device.complete(8 << 20);
    while (received.length < 3 * ACK_BYTES) await tick();
  });

  it('applies other writes as they arrive', async () => {
    sendWrite(1, 0, 1 << 20, 0);
    sendWrite(2, 4 << 20, 4096, 0);
    expect(await startedOnce(2)).toEqual([0, 4 << 20]);
    device.complete(4 << 20);
    device.complete(0);
    while (received.length < 2 * ACK_BYTES) await tick();
  });
});
