// `lockstep mediator` as a real process: copies racing for the next epoch of a group (exactly
// one wins), SIGKILLed while swaps stream in and restarted (no epoch it answered is lost or
// granted again), thousands of groups, and a damaged record file or a second mediator on the
// same data dir refused with a clear error.
import { adminTransport } from '../harness/test-certificates';
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { isLockstepError } from '../../lib/errors';
import { MediatorClient } from '../../lib/mediator-client';
import { MediatorProcess } from '../harness/mediator-process';

describe('the mediator', () => {
  const mediators: MediatorProcess[] = [];
  const clients: MediatorClient[] = [];
  const start = async () => {
    const m = new MediatorProcess();
    mediators.push(m);
    return m.start();
  };
  const client = (m: MediatorProcess) => {
    const c = m.client();
    clients.push(c);
    return c;
  };
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const m of mediators.splice(0)) await m.dispose();
  });

  it('grants the next epoch of a group to exactly one of the copies racing for it', async () => {
    const m = await start();
    const copies = Array.from({ length: 12 }, (_, i) => `10.0.0.${i + 1}:7400`);
    const answers = await Promise.all(
      copies.map((c) => client(m).compareAndSwap('shop.db', 0, c, [c])),
    );
    const winners = answers.filter((a) => a.granted);
    expect(winners).toHaveLength(1);
    const holder = winners[0].record.primary;
    // Every loser learns who holds the group, at which epoch.
    for (const a of answers) expect(a.record).toMatchObject({ epoch: 1, primary: holder });
    expect(await client(m).record('shop.db')).toMatchObject({
      group: 'shop.db',
      epoch: 1,
      primary: holder,
      inSync: [holder],
    });
    await expect(client(m).compareAndSwap('no spaces', 0, 'a:1', [])).rejects.toThrow(
      /not a valid name/,
    );
    const nobody = new MediatorClient('127.0.0.1:1', adminTransport(), 1000);
    clients.push(nobody);
    await expect(nobody.record('g')).rejects.toThrow(/cannot reach the mediator at 127\.0\.0\.1:1/);
  });

  it('SIGKILLed while swaps stream in and restarted, loses no epoch it answered and grants none twice', async () => {
    const m = await start();
    const granted: number[] = [];
    let stop = false;
    // Two copies take turns: each asks for the epoch after the last one it saw.
    const loop = async (me: string) => {
      const c = m.client();
      clients.push(c);
      let expected = 0;
      while (!stop) {
        try {
          const a = await c.compareAndSwap('g', expected, me, [me]);
          if (a.granted) granted.push(a.record.epoch);
          expected = a.record.epoch;
        } catch (err) {
          if (!isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE')) throw err;
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    };
    const loops = [loop('a:1'), loop('b:1')];
    await new Promise((r) => setTimeout(r, 1_000));
    await m.proc.kill('SIGKILL');
    const answeredBeforeKill = Math.max(...granted);
    expect(answeredBeforeKill).toBeGreaterThan(10);
    await m.start();
    const after = await client(m).record('g');
    // Every epoch answered before the kill is on disk; one written but not yet answered may be.
    expect(after.epoch).toBeGreaterThanOrEqual(answeredBeforeKill);
    await new Promise((r) => setTimeout(r, 500));
    stop = true;
    await Promise.all(loops);
    expect(new Set(granted).size).toBe(granted.length);
    expect(Math.max(...granted)).toBeGreaterThan(answeredBeforeKill);
  });

  it('holds thousands of groups', async () => {
    const m = await start();
    const c = client(m);
    const groups = Array.from({ length: 5_000 }, (_, i) => `ns.group-${i}`);
    // 500 at a time: each call has a deadline, and the machine is shared with other tests.
    for (let i = 0; i < groups.length; i += 500) {
      const answers = await Promise.all(
        groups.slice(i, i + 500).map((g) => c.compareAndSwap(g, 0, 'a:1', ['b:1'])),
      );
      expect(answers.every((a) => a.granted && a.record.epoch === 1)).toBe(true);
    }
    const records = await c.records();
    expect(records).toHaveLength(5_000);
    expect(records[0]).toMatchObject({ inSync: ['a:1', 'b:1'] });
  });

  it('refuses to start on a damaged record, or on a data dir another mediator holds', async () => {
    const m = await start();
    const c = client(m);
    for (let e = 0; e < 3; e++) await c.compareAndSwap('g', e, 'a:1', []);
    const second = new MediatorProcess(m.dataDir);
    mediators.push(second);
    const locked = await second.startRefused();
    expect(locked.code).toBe(1);
    expect(locked.log).toMatch(/data directory .* is in use by lockstep process/);

    await m.proc.kill('SIGKILL');
    const log = path.join(m.dataDir, 'records.log');
    const lines = readFileSync(log, 'utf8').split('\n');
    lines[0] = lines[0].replace('"primary":"a:1"', '"primary":"z:1"');
    writeFileSync(log, lines.join('\n'));
    const damaged = await m.startRefused();
    expect(damaged.code).toBe(1);
    expect(damaged.log).toMatch(/records\.log line 1 is damaged .* refusing to start/);
    // A torn last line alone is a write never answered: the mediator starts without it.
    writeFileSync(log, lines.slice(1).join('\n'));
    appendFileSync(log, '0000');
    await m.start();
    expect((await client(m).record('g')).epoch).toBe(3);
  });
});
