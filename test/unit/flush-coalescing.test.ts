// A volume file's flushes share fdatasyncs: one covers every write completed before it
// started, flushes called while it runs share the next, a failed one fails every later flush.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AllocationMap } from '../../sidecar/src/store/allocation-map';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';

const MiB = 1024 * 1024;

describe('flushes of a volume file', () => {
  let dir: string;
  let dev: FileBlockDevice;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lockstep-flush-'));
    const file = path.join(dir, 'data.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8 * MiB);
    dev = new FileBlockDevice(
      fs.openSync(file, 'r+'),
      8 * MiB,
      false,
      file,
      AllocationMap.fresh(8 * MiB),
    );
  });
  afterEach(() => {
    jest.restoreAllMocks();
    dev.close();
    fs.rmSync(dir, { recursive: true, force: true });
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
