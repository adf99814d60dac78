// First writes after a snapshot are answered before their new data reaches the volume file: it
// waits in the overwrite journal until the old data is durable. These tests take the files as a
// SIGKILL would leave them — copied the moment a write is answered, before any fdatasync could
// complete — and check that a new device over the copies reads every answered write, that each
// snapshot still reads its old data, and that a lost log record (a power loss) takes its write
// with it rather than breaking the snapshot.
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { tempVolumeFile, type TempVolumeFile } from './temp-volume-file';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';
import { AllocationMap } from '../../sidecar/src/store/allocation-map';
import { attachSnapshots } from '../../sidecar/src/store/volume-store';
import type { SnapshotCatalog } from '../../sidecar/src/snapshots/snapshot-catalog';
import { OverwriteJournal } from '../../sidecar/src/snapshots/overwrite-journal';

const KiB = 1024;
const MiB = 1024 * KiB;
const log = pino({ level: 'silent' });

interface Opened {
  dir: string;
  dev: FileBlockDevice;
  catalog: SnapshotCatalog;
}

async function openAt(dir: string, size: number): Promise<Opened> {
  const file = path.join(dir, 'data.img');
  const dev = new FileBlockDevice(
    fs.openSync(file, 'r+'),
    size,
    false,
    file,
    AllocationMap.unknown(size),
  );
  return { dir, dev, catalog: await attachSnapshots('v', dir, dev, log) };
}

function fill(length: number, byte: number): Buffer {
  return Buffer.alloc(length, byte);
}

/** The volume directory as a SIGKILL leaves it: copied without yielding to the event loop. */
function killedCopy(dir: string): string {
  const copy = `${dir}-killed`;
  fs.cpSync(dir, copy, { recursive: true });
  return copy;
}

function rawAt(dir: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(path.join(dir, 'data.img'), 'r');
  const out = Buffer.alloc(length);
  fs.readSync(fd, out, 0, length, offset);
  fs.closeSync(fd);
  return out;
}

async function readVolume(o: Opened, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  await o.dev.read(offset, out);
  return out;
}

async function readSnapshot(o: Opened, name: string, offset: number, length: number) {
  const out = Buffer.alloc(length);
  await o.catalog.read(name, offset, out);
  return out;
}

describe('the overwrite journal', () => {
  const size = 32 * MiB;
  let vol: TempVolumeFile;
  let dir: string;
  let opened: Opened[];
  beforeEach(() => {
    vol = tempVolumeFile('lockstep-journal-', size);
    dir = path.dirname(vol.file);
    opened = [];
  });
  afterEach(async () => {
    for (const o of opened) {
      await o.dev.flush();
      await o.catalog.close();
      o.dev.close();
      fs.rmSync(o.dir, { recursive: true, force: true });
    }
    vol.remove();
  });

  async function open(at: string): Promise<Opened> {
    const o = await openAt(at, size);
    opened.push(o);
    return o;
  }

  it('lands a first write answered just before a kill, and the snapshot keeps the old data', async () => {
    const v = await open(dir);
    await v.dev.write(0, fill(64 * KiB, 0xaa), false);
    await v.catalog.create('s1');
    await v.dev.write(8 * KiB, fill(4 * KiB, 0xbb), false);
    const copy = killedCopy(dir);
    // Answered, yet not in the volume file: it waits for its old data's fdatasync.
    expect(rawAt(copy, 8 * KiB, 4 * KiB).equals(fill(4 * KiB, 0xaa))).toBe(true);

    const after = await open(copy);
    expect((await readVolume(after, 8 * KiB, 4 * KiB)).equals(fill(4 * KiB, 0xbb))).toBe(true);
    expect((await readSnapshot(after, 's1', 0, 64 * KiB)).equals(fill(64 * KiB, 0xaa))).toBe(true);
    // Landed durably at the start: in the file itself now.
    expect(rawAt(copy, 8 * KiB, 4 * KiB).equals(fill(4 * KiB, 0xbb))).toBe(true);
  });

  it('drops a write whose old data a power loss took, and the snapshot stays whole', async () => {
    const v = await open(dir);
    await v.dev.write(0, fill(64 * KiB, 0xaa), false);
    await v.catalog.create('s1');
    await v.dev.write(8 * KiB, fill(4 * KiB, 0xbb), false);
    const copy = killedCopy(dir);
    // The log's only record never reached the disk.
    const logFile = path.join(copy, 'snapshots', 'snap-1.log');
    const fd = fs.openSync(logFile, 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * KiB), 0, 64 * KiB, 4096);
    fs.closeSync(fd);

    const after = await open(copy);
    expect((await readVolume(after, 0, 64 * KiB)).equals(fill(64 * KiB, 0xaa))).toBe(true);
    expect((await readSnapshot(after, 's1', 0, 64 * KiB)).equals(fill(64 * KiB, 0xaa))).toBe(true);
    expect(after.catalog.get('s1').savedBytes).toBe(0);
  });

  it('never lands a write again over a later one once a flush has passed', async () => {
    const v = await open(dir);
    await v.dev.write(0, fill(16 * KiB, 0xaa), false);
    await v.catalog.create('s1');
    await v.dev.write(0, fill(4 * KiB, 0xbb), false);
    await v.dev.flush();
    await v.dev.write(0, fill(4 * KiB, 0xcc), false);
    const copy = killedCopy(dir);

    const after = await open(copy);
    expect((await readVolume(after, 0, 4 * KiB)).equals(fill(4 * KiB, 0xcc))).toBe(true);
    expect((await readSnapshot(after, 's1', 0, 4 * KiB)).equals(fill(4 * KiB, 0xaa))).toBe(true);
  });

  it('reads and rewrites of a waiting block see its new data', async () => {
    const v = await open(dir);
    await v.dev.write(0, fill(16 * KiB, 0xaa), false);
    await v.catalog.create('s1');
    const first = v.dev.write(4 * KiB, fill(4 * KiB, 0xbb), false);
    const read = readVolume(v, 0, 16 * KiB);
    await first;
    const second = v.dev.write(4 * KiB, fill(2 * KiB, 0xcc), false);
    await second;
    const expected = Buffer.concat([fill(4 * KiB, 0xaa), fill(4 * KiB, 0xbb), fill(8 * KiB, 0xaa)]);
    const seen = await read;
    // The read raced the write: either whole state, never a mix inside the block.
    expect(seen.equals(expected) || seen.equals(fill(16 * KiB, 0xaa))).toBe(true);
    fill(2 * KiB, 0xcc).copy(expected, 4 * KiB);
    expect((await readVolume(v, 0, 16 * KiB)).equals(expected)).toBe(true);
    expect((await readSnapshot(v, 's1', 0, 16 * KiB)).equals(fill(16 * KiB, 0xaa))).toBe(true);
  });

  it('wraps around its ring: more first writes than it holds, all answered, all landed after a kill', async () => {
    const v = await open(dir);
    await v.dev.write(0, fill(size, 0x11), false);
    await v.catalog.create('s1');
    // 24 MiB of first writes against a 4 MiB ring, 16 at a time, in 64 KiB pieces.
    const piece = 64 * KiB;
    const pieces = (24 * MiB) / piece;
    for (let i = 0; i < pieces; i += 16)
      await Promise.all(
        Array.from({ length: 16 }, (_, k) =>
          v.dev.write((i + k) * piece, fill(piece, 1 + ((i + k) % 250)), false),
        ),
      );
    const copy = killedCopy(dir);

    const after = await open(copy);
    const image = await readVolume(after, 0, size);
    for (let i = 0; i < pieces; i++) {
      const got = image.subarray(i * piece, (i + 1) * piece);
      if (!got.equals(fill(piece, 1 + (i % 250)))) throw new Error(`piece ${i} did not land`);
    }
    expect(image.subarray(24 * MiB).equals(fill(8 * MiB, 0x11))).toBe(true);
    expect((await readSnapshot(after, 's1', 0, size)).equals(fill(size, 0x11))).toBe(true);
  });

  it('keeps an entry that landed ahead of an older one waiting until the older one is retired', async () => {
    const file = path.join(dir, 'order.journal');
    /** What a replay would land now, as a second opener of the file sees it. */
    const replayed = () => {
      const { journal: again, waiting } = OverwriteJournal.open(file);
      again.close();
      return waiting.map((e) => e.seq);
    };
    const { journal } = OverwriteJournal.open(file);
    try {
      const older = await journal.write(0, fill(4 * KiB, 1), 1, 4096);
      const newer = await journal.write(4 * KiB, fill(4 * KiB, 2), 1, 4096);
      journal.retire(newer);
      // A replay would still land the newer one: its blocks are not free yet.
      let free = false;
      void journal.whenRetired(newer)?.then(() => (free = true));
      await new Promise((r) => setImmediate(r));
      expect(free).toBe(false);
      expect(replayed()).toEqual([older, newer]);
      journal.retire(older);
      await new Promise((r) => setImmediate(r));
      expect(free).toBe(true);
      expect(journal.whenRetired(newer)).toBeUndefined();
      expect(replayed()).toEqual([]);
    } finally {
      journal.close();
    }
  });

  it('never replays an entry left behind a torn one as a later entry of the same number', async () => {
    const file = path.join(dir, 'torn.journal');
    const first = OverwriteJournal.open(file).journal;
    const a = await first.write(0, fill(4 * KiB, 1), 1, 4096);
    const b = await first.write(4 * KiB, fill(4 * KiB, 2), 1, 4096);
    await first.write(8 * KiB, fill(4 * KiB, 3), 1, 4096);
    first.close();
    // A power loss took the second entry; the third survived behind it.
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(64), 0, 64, 4096 + 4096 + 64);
    fs.closeSync(fd);
    const second = OverwriteJournal.open(file);
    expect(second.waiting.map((e) => e.seq)).toEqual([a]);
    second.journal.settleReplay();
    // A new entry of the torn one's size, where it lay: the old third now follows it.
    const next = await second.journal.write(4 * KiB, fill(4 * KiB, 9), 1, 4096);
    expect(next).toBeGreaterThan(b);
    second.journal.close();
    const third = OverwriteJournal.open(file);
    third.journal.close();
    expect(third.waiting.map((e) => [e.seq, e.data[0]])).toEqual([[next, 9]]);
  });

  it('refuses a journal whose header is damaged, with a clear error', async () => {
    const v = await open(dir);
    await v.dev.flush();
    await v.catalog.close();
    v.dev.close();
    opened = [];
    const fd = fs.openSync(path.join(dir, 'overwrites.journal'), 'r+');
    fs.writeSync(fd, Buffer.from('garbage!'), 0, 8, 12);
    fs.closeSync(fd);
    const dev = new FileBlockDevice(
      fs.openSync(vol.file, 'r+'),
      size,
      false,
      vol.file,
      AllocationMap.unknown(size),
    );
    await expect(attachSnapshots('v', dir, dev, log)).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_METADATA_CORRUPT',
      message: /overwrites\.journal: header damaged/,
    });
    dev.close();
  });
});
