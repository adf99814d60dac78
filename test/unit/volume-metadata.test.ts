import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  newVolumeMetadata,
  readVolumeMetadata,
  writeVolumeMetadata,
} from '../../sidecar/src/store/volume-metadata';

describe('volume metadata file', () => {
  let dir: string;
  let file: string;
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-meta-'));
    file = path.join(dir, 'meta.json');
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('round-trips and leaves no temp file behind', async () => {
    const meta = newVolumeMetadata({ name: 'vol', sizeBytes: 1 << 20 });
    await writeVolumeMetadata(file, meta);
    expect(await readVolumeMetadata(file)).toEqual(meta);
    expect(readdirSync(dir)).toEqual(['meta.json']);
  });

  it.each([
    ['empty', () => '', /it is empty/],
    ['truncated', (t: string) => t.slice(0, t.length / 2), /not valid JSON/],
    [
      'edited',
      (t: string) => t.replace('"readOnly": false', '"readOnly": true'),
      /checksum mismatch/,
    ],
    ['missing a field', (t: string) => t.replace(/"sizeBytes": \d+,/, ''), /field sizeBytes/],
    [
      'a wrong format version',
      (t: string) => t.replace('"format": 1', '"format": 9'),
      /field format/,
    ],
  ])('reports a file that is %s, naming it', async (_what, mangle, why) => {
    await writeVolumeMetadata(file, newVolumeMetadata({ name: 'vol', sizeBytes: 1 << 20 }));
    writeFileSync(file, mangle(readFileSync(file, 'utf8')));
    const err = await readVolumeMetadata(file).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'LOCKSTEP_ERR_METADATA_CORRUPT' });
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(why);
  });
});
