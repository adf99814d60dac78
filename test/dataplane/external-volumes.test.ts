// Volumes whose data file lives outside the agent's data dir, as a block file in a PVC does:
// adopted in place (existing data served as it is), created when absent, replicated to a
// secondary prepared on another file, and released without touching the data.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { fioVerify, run } from '../harness/agent-process';
import {
  expectSameImages,
  inSync,
  replicationAgent,
  volumeStatus,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;

interface VolumeJson {
  name: string;
  uuid: string;
  sizeBytes: number;
  role: string;
  dataPath: string;
  replication?: { peers: unknown[] };
}

describe('volumes on files outside the data dir', () => {
  const agents: AgentProcess[] = [];
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-pvc-'));
  });
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
    rmSync(dir, { recursive: true, force: true });
  });
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  const create = async (a: AgentProcess, ...args: string[]) =>
    JSON.parse(await a.ctl('volume', 'create', ...args, '-o', 'json')) as VolumeJson;

  it('adopts an existing file with its data, replicates it to a secondary on another file, and releases both keeping the data', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const source = path.join(dir, 'pvc-a', 'disk.img');
    const replica = path.join(dir, 'pvc-b', 'disk.img');
    const original = Buffer.alloc(8 * MiB);
    for (let i = 0; i < original.length; i += 4096) original.writeUInt32LE(i, i);
    mkdirSync(path.dirname(source), { recursive: true });
    writeFileSync(source, original);

    const v = await create(a, 'app', '--data-path', source);
    expect(v).toMatchObject({ sizeBytes: 8 * MiB, dataPath: source, role: 'primary' });
    // The data already in the file is what the export serves.
    const read = path.join(dir, 'read.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', a.uri('app'), read]);
    await expectSameImages(read, source);
    // The operator repeats itself: the same request is the same volume, another file is refused.
    expect((await create(a, 'app', '--data-path', source)).uuid).toBe(v.uuid);
    await expect(create(a, 'app', '--data-path', path.join(dir, 'other.img'))).rejects.toThrow(
      /LOCKSTEP_ERR_VOLUME_EXISTS/,
    );

    const s = await create(
      b,
      'app',
      '--data-path',
      replica,
      '--size',
      '8MiB',
      '--secondary-of',
      v.uuid,
    );
    expect(s).toMatchObject({ uuid: v.uuid, role: 'secondary', dataPath: replica });
    expect(existsSync(replica)).toBe(true);
    await a.ctl('replicate', 'app', '--to', b.grpcAddress);
    await waitPeer(a, 'app', b, inSync, 'baselined');
    await fioVerify(a.uri('app'), '8M');
    await waitPeer(a, 'app', b, inSync, 'in sync');
    await expectSameImages(source, replica);

    // A restart finds the adopted file again.
    await a.stop();
    await a.start();
    expect((await volumeStatus(a, 'app')).role).toBe('primary');
    await waitPeer(a, 'app', b, inSync, 'in sync after restart');

    await a.ctl('unreplicate', 'app');
    expect((await volumeStatus(a, 'app')).replication).toBeNull();
    const written = readFileSync(source);
    await b.ctl('volume', 'release', 'app');
    await a.ctl('volume', 'release', 'app');
    expect(JSON.parse(await a.ctl('volume', 'list', '-o', 'json'))).toEqual({ volumes: [] });
    expect(JSON.parse(await b.ctl('volume', 'list', '-o', 'json'))).toEqual({ volumes: [] });
    expect(readFileSync(source).equals(written)).toBe(true);
    expect(readFileSync(replica).equals(written)).toBe(true);
  });

  it('creates a missing file, deletes it with the volume, and refuses bad files and releasing data-dir volumes', async () => {
    const a = await start('node-a');
    const file = path.join(dir, 'new', 'disk.img');
    await expect(create(a, 'n', '--data-path', file)).rejects.toThrow(/needs a size/);
    expect((await create(a, 'n', '--data-path', file, '--size', '4MiB')).sizeBytes).toBe(4 * MiB);
    expect(existsSync(file)).toBe(true);
    await a.ctl('volume', 'delete', 'n');
    expect(existsSync(file)).toBe(false);

    const odd = path.join(dir, 'odd.img');
    writeFileSync(odd, Buffer.alloc(5000));
    await expect(create(a, 'odd', '--data-path', odd)).rejects.toThrow(/5000 bytes/);
    // The size only applies to a file that is created: an existing one is never resized.
    await expect(create(a, 'odd', '--data-path', odd, '--size', '8KiB')).rejects.toThrow(
      /odd.img is 5000 bytes; a volume must be a positive multiple of 4096/,
    );
    await expect(create(a, 'twice', '--data-path', file, '--size', '4MiB')).resolves.toBeTruthy();
    await expect(create(a, 'again', '--data-path', file)).rejects.toThrow(
      /already served as volume twice/,
    );
    await expect(create(a, 'rel', '--data-path', 'relative.img', '--size', '4MiB')).rejects.toThrow(
      /must be absolute/,
    );
    expect(readFileSync(odd).length).toBe(5000);

    await a.createVolume('inside', '4MiB');
    await expect(a.ctl('volume', 'release', 'inside')).rejects.toThrow(/LOCKSTEP_ERR_NOT_ALLOWED/);
    expect((await volumeStatus(a, 'inside')).name).toBe('inside');
  });
});
