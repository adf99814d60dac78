// Writes around the page cache (a secondary's catch-up data): they land where a buffered read
// sees them, even over a range the page cache held dirty, and anything that cannot go direct
// (unaligned, a buffer not from the device) is written through the cache instead.
import { execFileSync } from 'node:child_process';
import type { FileBlockDevice } from '../../sidecar/src/store/file-device';
import { tempVolumeFile, type TempVolumeFile } from './temp-volume-file';

const MiB = 1024 * 1024;

/** Bytes of `file` in the page cache. */
function cachedBytes(file: string): number {
  return Number(execFileSync('fincore', ['-b', '-n', '-o', 'RES', file], { encoding: 'utf8' }));
}

describe('writes around the page cache', () => {
  let vol: TempVolumeFile;
  let dataFile: string;
  let dev: FileBlockDevice;
  beforeEach(() => {
    vol = tempVolumeFile('lockstep-direct-', 8 * MiB);
    ({ file: dataFile, dev } = vol);
  });
  afterEach(() => vol.remove());

  it('writes an aligned buffer directly, coherent with what the cache held, and leaves it uncached', async () => {
    // Dirty, cached data first: the direct write must replace it, not be hidden by it.
    await dev.write(MiB, Buffer.alloc(MiB, 0x11), false);
    const buf = dev.tryAlignedBuffer(MiB, MiB)!;
    expect(buf).toBeDefined();
    buf.fill(0x22);
    await dev.writeAround(MiB, buf);
    dev.releaseAlignedBuffer(buf);
    const fresh = dev.tryAlignedBuffer(4 * MiB, MiB)!;
    fresh.fill(0x33);
    await dev.writeAround(4 * MiB, fresh);
    dev.releaseAlignedBuffer(fresh);
    await dev.flush();
    expect(cachedBytes(dataFile)).toBeLessThan(MiB / 2); // the direct writes left nothing behind
    const back = Buffer.alloc(MiB);
    await dev.read(MiB, back);
    expect(back.equals(Buffer.alloc(MiB, 0x22))).toBe(true);
    await dev.read(4 * MiB, back);
    expect(back.equals(Buffer.alloc(MiB, 0x33))).toBe(true);
    expect(dev.allocation.mayHoldData(4 * MiB, 1)).toBe(true);
  });

  it('falls back to the page cache for unaligned ranges and other buffers', async () => {
    expect(dev.tryAlignedBuffer(4096 + 512, 4096)).toBeUndefined();
    expect(dev.tryAlignedBuffer(0, 4096 + 512)).toBeUndefined();
    expect(dev.tryAlignedBuffer(0, 2 * MiB)).toBeUndefined(); // larger than a chunk
    const plain = Buffer.alloc(64 * 1024, 0x44);
    await dev.writeAround(2 * MiB + 512, plain);
    const back = Buffer.alloc(64 * 1024);
    await dev.read(2 * MiB + 512, back);
    expect(back.equals(plain)).toBe(true);
    expect(cachedBytes(dataFile)).toBeGreaterThanOrEqual(64 * 1024);
    expect(dev.releaseAlignedBuffer(plain)).toBe(false); // not its own: left alone
  });

  it('never waits for a buffer: with the chunks taken it says so, and they come back', () => {
    const taken: Buffer[] = [];
    for (let b = dev.tryAlignedBuffer(0, MiB); b; b = dev.tryAlignedBuffer(0, MiB)) taken.push(b);
    expect(taken.length).toBeGreaterThan(0);
    expect(dev.tryAlignedBuffer(0, 4096)).toBeUndefined();
    for (const b of taken) dev.releaseAlignedBuffer(b);
    const again = dev.tryAlignedBuffer(0, 4096);
    expect(again).toBeDefined();
    dev.releaseAlignedBuffer(again!);
  });
});
