import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ActivityLog, type ActivityLogOptions } from '../../sidecar/src/tracking/activity-log';

const MiB = 1024 * 1024;

describe('ActivityLog', () => {
  let dir: string;
  let file: string;
  let evictions: number;
  const opts = (): ActivityLogOptions => ({
    volumeUuid: '11111111-1111-4111-8111-111111111111',
    volumeSize: 64 * MiB,
    extentSize: 4 * MiB,
    capacity: 3,
    beforeEvict: () => {
      evictions++;
      return Promise.resolve();
    },
  });
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-al-'));
    file = path.join(dir, 'activity.log');
    evictions = 0;
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('makes a cold extent durable before the write proceeds, and hot ones cost nothing', async () => {
    const log = await ActivityLog.start(file, opts());
    const p = log.ensure(5 * MiB, 4096);
    expect(p).toBeInstanceOf(Promise);
    await p;
    expect(await ActivityLog.recover(file, opts())).toEqual([{ offset: 4 * MiB, length: 4 * MiB }]);
    expect(log.ensure(5 * MiB + 8192, 4096)).toBeUndefined();
    log.release(5 * MiB, 4096);
    log.release(5 * MiB + 8192, 4096);
  });

  it('shares one commit among writes that need one at the same time, spanning extents', async () => {
    const log = await ActivityLog.start(file, opts());
    await Promise.all([log.ensure(0, 4096), log.ensure(4 * MiB - 1, 2), log.ensure(8 * MiB, 1)]);
    const extents = (JSON.parse(readFileSync(file, 'utf8')) as { extents: number[] }).extents;
    expect(extents).toEqual([0, 1, 2]);
  });

  it('evicts idle extents, least recently used first, after saving the bitmaps', async () => {
    const log = await ActivityLog.start(file, opts());
    for (const e of [0, 1, 2]) {
      await log.ensure(e * 4 * MiB, 1);
      log.release(e * 4 * MiB, 1);
    }
    await log.ensure(0, 1); // extent 0 is now the most recent
    log.release(0, 1);
    await log.ensure(10 * 4 * MiB, 1);
    expect(evictions).toBe(1);
    const extents = (JSON.parse(readFileSync(file, 'utf8')) as { extents: number[] }).extents;
    expect(extents).toEqual([0, 2, 10]);
  });

  it('waits for an extent to go idle when all are busy', async () => {
    const log = await ActivityLog.start(file, opts());
    for (const e of [0, 1, 2]) await log.ensure(e * 4 * MiB, 1);
    let done = false;
    const p = log.ensure(20 * MiB, 1)!.then(() => (done = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(done).toBe(false);
    log.release(4 * MiB, 1);
    await p;
    expect(done).toBe(true);
  });

  it('recovers nothing after a clean shutdown and everything from a corrupt log', async () => {
    const log = await ActivityLog.start(file, opts());
    await log.ensure(0, 1);
    log.release(0, 1);
    await log.markClean();
    expect(await ActivityLog.recover(file, opts())).toEqual([]);
    writeFileSync(file, '{"format":1,"extents":[');
    expect(await ActivityLog.recover(file, opts())).toBe('all');
  });
});
