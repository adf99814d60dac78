// A volume file's flushes share fdatasyncs: one covers every write completed before it
// started, flushes called while it runs share the next, a failed one fails every later flush.
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
    await dev.flush();
    expect(dev.syncs).toBe(3);
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
