// The mediator's records on a real disk: one swap per epoch, answered once durable; recovery
// after a write cut short; a damaged record refuses the start rather than risk granting an
// epoch twice; compaction keeps every record.
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RecordStore } from '../../mediator/src/record-store';

describe('the mediator’s records', () => {
  let dir = '';
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-mediator-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('grants each epoch once: of two swaps from the same epoch, even in one turn, one wins', async () => {
    const store = await RecordStore.open(dir);
    expect(store.get('g')).toMatchObject({ epoch: 0, primary: '' });
    const [x, y] = await Promise.all([
      store.compareAndSwap('g', 0, 'a:1', ['a:1', 'b:1']),
      store.compareAndSwap('g', 0, 'b:1', ['b:1']),
    ]);
    expect(x).toMatchObject({ granted: true, record: { epoch: 1, primary: 'a:1' } });
    expect(y).toMatchObject({ granted: false, record: { epoch: 1, primary: 'a:1' } });
    expect(x.record.inSync).toEqual(['a:1', 'b:1']);
    // A stale expectation learns who holds the group now; the right one moves it on.
    expect(await store.compareAndSwap('g', 0, 'b:1', ['b:1'])).toMatchObject({ granted: false });
    expect(await store.compareAndSwap('g', 1, 'b:1', ['b:1'])).toMatchObject({
      granted: true,
      record: { epoch: 2, primary: 'b:1' },
    });
    await store.close();
  });

  it('grants at least the epoch asked for, and keeps it across a restart', async () => {
    let store = await RecordStore.open(dir);
    // A copy that has seen epoch 7 asks an empty mediator (one that lost its data).
    expect(await store.compareAndSwap('g', 0, 'a:1', ['a:1'], 8)).toMatchObject({
      granted: true,
      record: { epoch: 8 },
    });
    // The floor never lowers an epoch: a swap from 8 gives 9 whatever it asks.
    expect(await store.compareAndSwap('g', 8, 'b:1', ['b:1'], 3)).toMatchObject({
      record: { epoch: 9, primary: 'b:1' },
    });
    await store.close();
    store = await RecordStore.open(dir);
    expect(store.get('g')).toMatchObject({ epoch: 9, primary: 'b:1' });
    expect(await store.compareAndSwap('g', 8, 'a:1', ['a:1'], 20)).toMatchObject({
      granted: false,
    });
    await store.close();
  });

  it('keeps every granted record across a restart, and drops a last write cut short', async () => {
    let store = await RecordStore.open(dir);
    for (let e = 0; e < 5; e++) await store.compareAndSwap('g', e, `n${e}:1`, []);
    await store.compareAndSwap('h', 0, 'x:1', []);
    await store.close();
    // A write the crash cut short: never answered, so it goes.
    appendFileSync(path.join(dir, 'records.log'), '1234abcd {"group":"g","epoch":6');

    store = await RecordStore.open(dir);
    expect(store.get('g')).toMatchObject({ epoch: 5, primary: 'n4:1', inSync: ['n4:1'] });
    expect(store.list().map((r) => r.group)).toEqual(['g', 'h']);
    expect(await store.compareAndSwap('g', 5, 'n5:1', [])).toMatchObject({ granted: true });
    await store.close();
    store = await RecordStore.open(dir);
    expect(store.get('g').epoch).toBe(6);
    await store.close();
    const lines = readFileSync(path.join(dir, 'records.log'), 'utf8').trim().split('\n');
    expect(lines).toHaveLength(7);
  });

  it('refuses to start on a damaged record that others follow, or a damaged snapshot, naming it', async () => {
    const store = await RecordStore.open(dir);
    for (let e = 0; e < 3; e++) await store.compareAndSwap('g', e, 'a:1', []);
    await store.close();
    const log = path.join(dir, 'records.log');
    const lines = readFileSync(log, 'utf8').split('\n');
    lines[1] = lines[1].replace('"epoch":2', '"epoch":9');
    writeFileSync(log, lines.join('\n'));
    await expect(RecordStore.open(dir)).rejects.toThrow(
      /records\.log line 2 is damaged .* refusing to start/,
    );
    rmSync(log);
    writeFileSync(path.join(dir, 'records.snapshot'), '[{"group":"g","epoch":"x"}]');
    await expect(RecordStore.open(dir)).rejects.toThrow(/records\.snapshot is damaged/);
  });

  it('compacts a long log into the snapshot, keeping every record and the epochs after it', async () => {
    let store = await RecordStore.open(dir);
    const groups = Array.from({ length: 10_001 }, (_, i) => `g${i}`);
    const answers = await Promise.all(groups.map((g) => store.compareAndSwap(g, 0, 'a:1', [])));
    expect(answers.every((a) => a.granted)).toBe(true);
    expect(readFileSync(path.join(dir, 'records.log'), 'utf8')).toBe('');
    await store.compareAndSwap('g7', 1, 'b:1', []);
    await store.close();
    store = await RecordStore.open(dir);
    expect(store.list()).toHaveLength(10_001);
    expect(store.get('g7')).toMatchObject({ epoch: 2, primary: 'b:1' });
    expect(store.get('g10000')).toMatchObject({ epoch: 1, primary: 'a:1' });
    await store.close();
  });
});
