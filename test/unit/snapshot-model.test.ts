// Snapshots against a plain in-memory model: a random sequence of writes (aligned or not),
// zero-writes, snapshots, deletes (oldest, middle, newest), rollbacks and reopenings of the
// catalog is applied to a real volume file and to the model, and after every step the volume
// and every snapshot compare byte for byte with the model.
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { SnapshotCatalog } from '../../sidecar/src/snapshots/snapshot-catalog';
import { tempVolumeFile, type TempVolumeFile } from './temp-volume-file';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';
import { AllocationMap } from '../../sidecar/src/store/allocation-map';
import { CloneBacking } from '../../sidecar/src/snapshots/clone-backing';
import { attachSnapshots } from '../../sidecar/src/store/volume-store';
import { SavedLog } from '../../sidecar/src/snapshots/saved-log';

/** A clone of one of the snapshots, and what it must read as. */
interface Clone {
  vol: TempVolumeFile;
  backing: CloneBacking;
  snapshot: string;
  model: Buffer;
}

async function openClone(
  vol: TempVolumeFile,
  catalog: SnapshotCatalog,
  snapshot: string,
): Promise<CloneBacking> {
  const dir = path.dirname(vol.file);
  const backing = await CloneBacking.open(
    dir,
    { volume: 'v', snapshot },
    catalog,
    SIZE,
    (o, d) => vol.dev.writeBelow(o, d),
    () => vol.dev.flush(),
    log,
    () => vol.dev.setBacking(undefined),
  );
  vol.dev.allocation.markWritten(0, SIZE);
  vol.dev.setBacking(backing);
  return backing;
}

async function expectClones(clones: Clone[]): Promise<void> {
  for (const c of clones) {
    const got = Buffer.alloc(SIZE);
    await c.vol.dev.read(0, got);
    if (!got.equals(c.model)) {
      const at = got.findIndex((b, i) => b !== c.model[i]);
      throw new Error(`clone of ${c.snapshot} differs from the model at byte ${at}`);
    }
  }
}

const SIZE = 512 * 1024;
const log = pino({ level: 'silent' });

/** A deterministic generator, so that a failing sequence can be replayed from its seed. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

interface Volume {
  dev: FileBlockDevice;
  catalog: SnapshotCatalog;
}

async function open(vol: TempVolumeFile, dir: string, fresh: boolean): Promise<Volume> {
  const dev = fresh
    ? vol.dev
    : new FileBlockDevice(
        fs.openSync(vol.file, 'r+'),
        SIZE,
        false,
        vol.file,
        AllocationMap.unknown(SIZE),
      );
  const catalog = await attachSnapshots('v', dir, dev, log);
  return { dev, catalog };
}

async function expectSame(v: Volume, model: Buffer, snaps: Map<string, Buffer>): Promise<void> {
  const got = Buffer.alloc(SIZE);
  await v.dev.read(0, got);
  expect(got.equals(model)).toBe(true);
  expect(v.catalog.list().map((s) => s.name)).toEqual([...snaps.keys()]);
  for (const [name, image] of snaps) {
    const snap = Buffer.alloc(SIZE);
    await v.catalog.read(name, 0, snap);
    if (!snap.equals(image)) {
      const at = snap.findIndex((b, i) => b !== image[i]);
      throw new Error(`snapshot ${name} differs from the model at byte ${at}`);
    }
    // An unaligned read through the middle of blocks.
    const part = Buffer.alloc(6000);
    await v.catalog.read(name, 4096 * 3 + 100, part);
    expect(part.equals(image.subarray(4096 * 3 + 100, 4096 * 3 + 6100))).toBe(true);
  }
}

/**
 * Writes 0xaa over blocks 0-1, snapshots s1, overwrites both blocks: two records in its log,
 * the first durable (flushed) before the second was written.
 */
async function twoRecords(v: Volume): Promise<void> {
  await v.dev.write(0, Buffer.alloc(8192, 0xaa), false);
  await v.catalog.create('s1');
  await v.dev.write(0, Buffer.alloc(4096, 0xbb), false);
  await v.dev.flush();
  await v.dev.write(4096, Buffer.alloc(4096, 0xcc), false);
  await v.dev.flush();
  await v.catalog.close();
}

/** Overwrites bytes of a snapshot's log, as a crash or a bad disk would. */
function damage(dir: string, at: number, bytes: Buffer): void {
  const fd = fs.openSync(path.join(dir, 'snapshots', 'snap-1.log'), 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, at);
  fs.closeSync(fd);
}

describe('snapshots against an in-memory model', () => {
  let vol: TempVolumeFile;
  let dir: string;
  beforeEach(() => {
    vol = tempVolumeFile('lockstep-snap-model-', SIZE);
    dir = path.dirname(vol.file);
  });
  afterEach(() => vol.remove());

  it.each([1, 2, 3, 4])('random sequence (seed %i)', async (seed) => {
    const rnd = random(seed);
    const int = (n: number) => Math.floor(rnd() * n);
    let v = await open(vol, dir, true);
    const model = Buffer.alloc(SIZE);
    const snaps = new Map<string, Buffer>();
    const clones: Clone[] = [];
    let counter = 0;
    try {
      for (let step = 0; step < 120; step++) {
        const op = int(100);
        // Writes go to the volume, or now and then to a clone.
        const clone = clones.length > 0 && rnd() < 0.3 ? clones[int(clones.length)] : undefined;
        const dev = clone ? clone.vol.dev : v.dev;
        const image = clone ? clone.model : model;
        if (op < 45) {
          const aligned = rnd() < 0.5;
          const length = aligned ? (1 + int(24)) * 4096 : 1 + int(20000);
          const offset = aligned ? int((SIZE - length) / 4096) * 4096 : int(SIZE - length);
          const data = Buffer.alloc(length, 1 + int(255));
          data.writeUInt32LE(step, 0);
          await dev.write(offset, data, false);
          data.copy(image, offset);
        } else if (op < 52) {
          const length = (1 + int(40)) * 4096;
          const offset = int((SIZE - length) / 4096) * 4096;
          await dev.writeZeroes(offset, length, { fua: false, noHole: rnd() < 0.5 });
          image.fill(0, offset, offset + length);
        } else if (op < 57 && snaps.size > 0 && clones.length < 3) {
          const names = [...snaps.keys()];
          const snapshot = names[int(names.length)];
          const cv = tempVolumeFile('lockstep-snap-clone-', SIZE);
          await CloneBacking.create(path.dirname(cv.file), { volume: 'v', snapshot });
          const backing = await openClone(cv, v.catalog, snapshot);
          if (rnd() < 0.5) backing.startHydration();
          clones.push({ vol: cv, backing, snapshot, model: Buffer.from(snaps.get(snapshot)!) });
        } else if (op < 70) {
          const name = `s${++counter}`;
          await v.catalog.create(name, rnd() < 0.5 ? 'daily' : '');
          snaps.set(name, Buffer.from(model));
        } else if (op < 82 && snaps.size > 0) {
          // A snapshot an unhydrated clone reads from stays (the agent refuses to delete it).
          const needed = new Set(
            clones.filter((c) => !c.backing.isStandalone).map((c) => c.snapshot),
          );
          const names = [...snaps.keys()].filter((n) => !needed.has(n));
          if (names.length === 0) continue;
          const name = names[int(names.length)];
          await v.catalog.delete(name);
          snaps.delete(name);
          if (rnd() < 0.5) await v.catalog.settled();
        } else if (op < 92 && snaps.size > 0) {
          const names = [...snaps.keys()];
          const name = names[int(names.length)];
          for (const [b] of v.catalog.changedBlocks(name).pieces(1)) {
            const data = Buffer.alloc(4096);
            await v.catalog.read(name, b * 4096, data);
            await v.dev.write(b * 4096, data, false);
          }
          snaps.get(name)!.copy(model);
        } else {
          // A restart: everything reported must be back from the files alone.
          for (const c of clones) await c.backing.close();
          // (A flush lets the writes waiting in the journal land: the old device is gone for good.)
          await v.dev.flush();
          await v.catalog.close();
          v.dev.close();
          v = await open(vol, dir, false);
          for (const c of clones) {
            if (c.backing.isStandalone) continue;
            c.backing = await openClone(c.vol, v.catalog, c.snapshot);
            if (rnd() < 0.5) c.backing.startHydration();
          }
        }
        await expectSame(v, model, snaps);
        await expectClones(clones);
      }
      await v.catalog.settled();
      await expectSame(v, model, snaps);
      // Every clone hydrates to stand alone, and still reads the same.
      for (const c of clones) c.backing.startHydration();
      for (const c of clones) {
        for (let i = 0; i < 500 && !c.backing.isStandalone; i++)
          await new Promise((r) => setTimeout(r, 10));
        expect(c.backing.isStandalone).toBe(true);
      }
      await expectClones(clones);
    } finally {
      for (const c of clones) {
        await c.backing.close();
        c.vol.remove();
      }
      await v.catalog.close();
      if (v.dev !== vol.dev) v.dev.close();
    }
  });

  it('a torn record at the end of a log is dropped, and the records before it are kept', async () => {
    const v = await open(vol, dir, true);
    await twoRecords(v);
    v.dev.close();
    // Tear the second record: a crash in the middle of an append that never returned.
    const second = 4096 + 24 + 8 + 4096;
    damage(dir, second + 24 + 8 + 50, Buffer.alloc(100, 0x55));
    const again = await open(vol, dir, false);
    const block0 = Buffer.alloc(4096);
    await again.catalog.read('s1', 0, block0);
    expect(block0.equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    expect([...again.catalog.changedBlocks('s1').pieces(1)]).toEqual([[0, 1]]);
    await again.catalog.close();
    again.dev.close();
  });

  it('a record left whole behind a torn one is cut off, never read after a new record', async () => {
    const file = path.join(dir, 'torn.log');
    const description = { id: 9, name: 's9', label: '', createdAtMs: 0, uid: 'u9' };
    const first = await SavedLog.create(file, description);
    await first.write([{ block: 0, data: Buffer.alloc(4096, 1) }]);
    await first.write([{ block: 1, data: Buffer.alloc(4096, 2) }]);
    await first.close();
    // A power loss took the first record (never durable); the second survived behind it.
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(24), 0, 24, 4096);
    fs.closeSync(fd);
    const second = await SavedLog.open(file);
    expect([...second.index.keys()]).toEqual([]);
    // A new record of the same length where the torn one lay.
    await second.append([{ block: 7, data: Buffer.alloc(4096, 7) }]);
    await second.close();
    const third = await SavedLog.open(file);
    expect([...third.index.keys()]).toEqual([7]);
    await third.close();
  });

  it('a damaged record with whole records after it is refused, not silently cut short', async () => {
    await twoRecords(await open(vol, dir, true));
    // A flipped byte in the first record's data: the second record is still whole.
    damage(dir, 4096 + 24 + 8 + 10, Buffer.from([0x00]));
    await expect(
      SnapshotCatalog.open('v', dir, SIZE, (o, t) => vol.dev.read(o, t), vol.dev.allocation, log),
    ).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_METADATA_CORRUPT',
      message: /snap-1\.log: record at byte 4096 is damaged/,
    });
  });

  it('a log whose header is damaged is refused with a clear error', async () => {
    const v = await open(vol, dir, true);
    await v.catalog.create('s1');
    await v.catalog.close();
    damage(dir, 20, Buffer.from('garbage!'));
    await expect(
      SnapshotCatalog.open('v', dir, SIZE, (o, t) => vol.dev.read(o, t), vol.dev.allocation, log),
    ).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_METADATA_CORRUPT',
      message: /snap-1\.log: header checksum mismatch/,
    });
  });

  it('many concurrent first writes to the same blocks save each block once, before it changes', async () => {
    const v = await open(vol, dir, true);
    await v.dev.write(0, Buffer.alloc(SIZE, 0x11), false);
    await v.catalog.create('s1');
    await Promise.all(
      Array.from({ length: 64 }, (_, i) =>
        v.dev.write((i % 8) * 4096, Buffer.alloc(4096, i + 1), false),
      ),
    );
    const snap = Buffer.alloc(SIZE);
    await v.catalog.read('s1', 0, snap);
    expect(snap.equals(Buffer.alloc(SIZE, 0x11))).toBe(true);
    expect(v.catalog.get('s1').savedBytes).toBeLessThan(8 * 4096 * 1.1);
    await v.catalog.close();
  });
});
