// A volume file's flushes share fdatasyncs: one covers every write completed before it
// started, flushes called while it runs share it or the next, one starts ahead of the flush a
// client's rhythm says is coming, and a failed one fails every later flush.
import fs from 'node:fs';
import type { FileBlockDevice } from '../../sidecar/src/store/file-device';
import { tempVolumeFile, type TempVolumeFile } from './temp-volume-file';

const MiB = 1024 * 1024;

describe('flushes of a volume file', () => {
  let vol: TempVolumeFile;
  let dev: FileBlockDevice;
  beforeEach(() => {
    vol = tempVolumeFile('lockstep-flush-', 8 * MiB);
    dev = vol.dev;
  });
  afterEach(() => {
    jest.restoreAllMocks();
    vol.remove();
  });

  it('meets flushes called together with one fdatasync, and those called during it with one more', async () => {
    await dev.write(0, Buffer.alloc(4096, 1), false);
    const first = Array.from({ length: 10 }, () => dev.flush());
    expect(dev.syncs).toBe(1);
    // Its write completed after the running fdatasync started: only the next one covers it.
    await dev.write(4096, Buffer.alloc(4096, 2), false);
    const second = Array.from({ length: 10 }, () => dev.flush());
    await Promise.all([...first, ...second]);
    expect(dev.syncs).toBe(2);
    // No write completed since the second started: it covers this one too.
    await dev.flush();
    expect(dev.syncs).toBe(2);
    await dev.write(8192, Buffer.alloc(4096, 3), false);
    await dev.flush();
    expect(dev.syncs).toBe(3);
  });

  it('syncs at the first flush after the file is opened, written or not: an earlier process may have left writes in the page cache', async () => {
    await dev.flush();
    expect(dev.syncs).toBe(1);
    await dev.flush();
    expect(dev.syncs).toBe(1);
  });

  it('lets a flush share the running fdatasync when no write completed since it started', async () => {
    await dev.write(0, Buffer.alloc(4096, 1), false);
    const first = dev.flush();
    const second = dev.flush();
    await Promise.all([first, second]);
    expect(dev.syncs).toBe(1);
  });

  it('starts the fdatasync of a client that flushes after every N writes once its N-th write is done', async () => {
    // The rhythm is learnt from one round: 2 writes, then a flush.
    await dev.write(0, Buffer.alloc(4096, 1), false);
    await dev.write(4096, Buffer.alloc(4096, 2), false);
    await dev.flush();
    expect(dev.syncs).toBe(1);
    await dev.write(8192, Buffer.alloc(4096, 3), false);
    expect(dev.syncs).toBe(1);
    await dev.write(12288, Buffer.alloc(4096, 4), false);
    expect(dev.syncs).toBe(2); // started ahead, before any flush asked for it
    await dev.flush(); // shares it
    expect(dev.syncs).toBe(2);
    // A flush with no write before it does not change the rhythm.
    await dev.flush();
    await dev.write(16384, Buffer.alloc(4096, 5), false);
    await dev.write(20480, Buffer.alloc(4096, 6), false);
    expect(dev.syncs).toBe(3);
    await dev.flush();
    expect(dev.syncs).toBe(3);
  });

  it('starts none ahead for a client that never flushes', async () => {
    for (let i = 0; i < 16; i++) await dev.write(i * 4096, Buffer.alloc(4096, i), false);
    expect(dev.syncs).toBe(0);
  });

  it('fails the next flush when an fdatasync started ahead fails', async () => {
    await dev.write(0, Buffer.alloc(4096, 1), false);
    await dev.flush();
    const real = fs.fdatasync;
    jest
      .spyOn(fs, 'fdatasync')
      .mockImplementationOnce((fd, cb) =>
        real(fd, () => cb(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }))),
      );
    await dev.write(4096, Buffer.alloc(4096, 2), false); // its fdatasync starts ahead, and fails
    expect(dev.syncs).toBe(2);
    await expect(dev.flush()).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_IO' });
    await expect(dev.flush()).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_IO' });
  });

  it('closes the file only after an fdatasync started ahead has ended', async () => {
    await dev.write(0, Buffer.alloc(4096, 1), false);
    await dev.flush();
    const closeSpy = jest.spyOn(fs, 'closeSync');
    await dev.write(4096, Buffer.alloc(4096, 2), false); // starts one ahead
    dev.close();
    expect(closeSpy).not.toHaveBeenCalled();
    while (closeSpy.mock.calls.length === 0) await new Promise((r) => setTimeout(r, 5));
    expect(dev.syncs).toBe(2);
  });

  it('shares fdatasyncs between FUA writes and flushes', async () => {
    await Promise.all([
      ...Array.from({ length: 8 }, (_, i) => dev.write(i * 4096, Buffer.alloc(4096, i), true)),
      dev.flush(),
    ]);
    expect(dev.syncs).toBeLessThanOrEqual(2);
  });

  it('fails every flush after a failed fdatasync, including those that were waiting for the next one', async () => {
    const real = fs.fdatasync;
    jest
      .spyOn(fs, 'fdatasync')
      .mockImplementationOnce((fd, cb) =>
        real(fd, () => cb(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }))),
      );
    const failing = dev.flush();
    const queued = dev.write(0, Buffer.alloc(4096, 1), true);
    await expect(failing).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_IO' });
    await expect(queued).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_IO' });
    await expect(dev.flush()).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_IO' });
    expect(dev.syncs).toBe(1);
  });
});
