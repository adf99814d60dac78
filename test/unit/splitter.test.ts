// The splitter's logic with fake legs: for each mode and each way a peer can answer, what the
// client gets, what the peer's bitmap records, and what happens to the peer's link.
import { LockstepError } from '../../lib/errors';
import { policyFor } from '../../sidecar/src/engine/mode-policy';
import { Splitter, type PeerLeg } from '../../sidecar/src/engine/splitter';
import type { OpKind } from '../../sidecar/src/replication/frames';
import { PeerUnavailable, type Route } from '../../sidecar/src/replication/peer-link';
import { STREAMING_STATES, type PeerState } from '../../sidecar/src/replication/replication-status';
import { SendBatch } from '../../sidecar/src/replication/send-batch';
import type { BlockDevice } from '../../sidecar/src/block-device';
import type { ReplicationMode } from '../../sidecar/src/store/volume-metadata';

const REGION = 64 * 1024;

type Outcome = 'acked' | 'failed' | 'timed out' | 'not streaming';

class MemoryDevice implements BlockDevice {
  readonly readOnly = false;
  readonly data = Buffer.alloc(1024 * 1024);
  fail = false;
  /** What happened, in order, across the device and the legs. */
  constructor(private readonly events: string[]) {}
  get size(): number {
    return this.data.length;
  }
  read(offset: number, target: Buffer): Promise<void> {
    this.data.copy(target, 0, offset, offset + target.length);
    return Promise.resolve();
  }
  write(offset: number, data: Buffer): Promise<void> {
    this.events.push('local write');
    if (this.fail) return Promise.reject(new LockstepError('LOCKSTEP_ERR_NO_SPACE', 'full'));
    data.copy(this.data, offset);
    return Promise.resolve();
  }
  writeZeroes(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
    return Promise.resolve();
  }
  trim(): Promise<void> {
    return Promise.resolve();
  }
  flush(): Promise<void> {
    this.events.push('local flush');
    return Promise.resolve();
  }
}

class FakeLeg implements PeerLeg {
  state: PeerState;
  readonly sent: { kind: OpKind; route: Route }[] = [];
  readonly failures: string[] = [];
  resyncs = 0;
  /** Set to hold the next sends until `release` is called. */
  hold: Promise<void> | undefined;

  constructor(
    readonly address: string,
    public outcome: Outcome,
    private readonly events: string[],
  ) {
    this.state = outcome === 'not streaming' ? 'Disconnected' : 'InSync';
  }
  get streaming(): boolean {
    return STREAMING_STATES.has(this.state);
  }
  async send(
    kind: OpKind,
    _offset: number,
    _length: number,
    _data: Buffer | undefined,
    _flags: number,
    route: Route,
  ): Promise<void> {
    this.events.push(`send ${this.address}`);
    this.sent.push({ kind, route });
    if (this.hold) await this.hold;
    switch (this.outcome) {
      case 'acked':
        return;
      case 'failed':
        throw new LockstepError('LOCKSTEP_ERR_IO', `peer ${this.address} failed op 1 with errno 5`);
      case 'timed out':
        throw new PeerUnavailable(this.address, 'no acknowledgement for 1500 ms');
      case 'not streaming':
        throw new Error('a peer that is not streaming is never sent anything');
    }
  }
  fail(reason: string): void {
    this.failures.push(reason);
    this.state = 'Disconnected';
  }
  resyncInPlace(): void {
    this.resyncs++;
  }
}

function setup(mode: ReplicationMode, outcomes: Outcome[]) {
  const events: string[] = [];
  const local = new MemoryDevice(events);
  const legs = outcomes.map((o, i) => new FakeLeg(`peer-${i}`, o, events));
  const missed: { peer: string; offset: number; length: number }[] = [];
  let active = 0;
  const splitter = new Splitter({
    local,
    peers: legs,
    policy: policyFor(mode),
    authority: { admit: () => undefined, missed: () => undefined },
    regionSize: REGION,
    batch: new SendBatch(),
    activity: {
      ensure: () => {
        active++;
        return undefined;
      },
      release: () => {
        active--;
      },
    },
    peerMissed: (peer, offset, length) => missed.push({ peer, offset, length }),
  });
  return { splitter, local, legs, missed, events, active: () => active };
}

async function outcomeOf(p: Promise<void>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (err) {
    return err instanceof LockstepError ? err.code : String(err);
  }
}

describe('the splitter: mode × peer outcome', () => {
  // [mode, peer outcome, client reply, peer's bitmap marked, link failed by the engine]
  const table: [ReplicationMode, Outcome, string, boolean, boolean][] = [
    ['sync', 'acked', 'ok', false, false],
    ['sync', 'failed', 'ok', true, true],
    ['sync', 'timed out', 'ok', true, false],
    ['sync', 'not streaming', 'ok', true, false],
    ['strict-sync', 'acked', 'ok', false, false],
    ['strict-sync', 'failed', 'LOCKSTEP_ERR_IO', true, true],
    ['strict-sync', 'timed out', 'LOCKSTEP_ERR_IO', true, false],
    ['strict-sync', 'not streaming', 'LOCKSTEP_ERR_IO', false, false],
    ['async', 'acked', 'ok', false, false],
    ['async', 'failed', 'ok', true, true],
    ['async', 'timed out', 'ok', true, false],
    ['async', 'not streaming', 'ok', true, false],
  ];

  it.each(table)('%s, peer %s → %s', async (mode, outcome, reply, marked, failed) => {
    const { splitter, local, legs, missed, active } = setup(mode, [outcome]);
    expect(await outcomeOf(splitter.write(REGION, Buffer.alloc(4096, 7), false))).toBe(reply);
    await splitter.drain();
    expect(missed.length > 0).toBe(marked);
    if (marked) expect(missed[0]).toEqual({ peer: 'peer-0', offset: REGION, length: 4096 });
    expect(legs[0].failures.length).toBe(failed ? 1 : 0);
    // strict-sync refuses a write it cannot replicate before the local copy has it.
    const refused = mode === 'strict-sync' && outcome === 'not streaming';
    expect(local.data[REGION]).toBe(refused ? 0 : 7);
    expect(legs[0].sent.length).toBe(outcome === 'not streaming' ? 0 : 1);
    expect(active()).toBe(0);
  });

  it.each([
    ['sync', 'spread'],
    ['strict-sync', 'spread'],
    ['async', 'ordered'],
  ] as const)('%s sends its ops %s', async (mode, route) => {
    const { splitter, legs } = setup(mode, ['acked']);
    await splitter.write(0, Buffer.alloc(4096), false);
    await splitter.flush();
    expect(legs[0].sent.map((s) => s.route)).toEqual([route, route]);
  });

  it('sends to the peers before the local write starts', async () => {
    const { splitter, events } = setup('sync', ['acked', 'acked']);
    await Promise.all([
      splitter.write(0, Buffer.alloc(4096), false),
      splitter.write(REGION, Buffer.alloc(4096), false),
    ]);
    expect(events).toEqual([
      'send peer-0',
      'send peer-1',
      'send peer-0',
      'send peer-1',
      'local write',
      'local write',
    ]);
  });

  it('answers sync writes when the peer has them, async writes when the local copy has them', async () => {
    for (const [mode, early] of [
      ['sync', false],
      ['async', true],
    ] as const) {
      const { splitter, legs } = setup(mode, ['acked']);
      let release!: () => void;
      legs[0].hold = new Promise((r) => (release = r));
      let answered = false;
      const write = splitter.write(0, Buffer.alloc(4096), false).then(() => (answered = true));
      await new Promise((r) => setImmediate(r));
      expect(answered).toBe(early);
      release();
      await write;
      await splitter.drain();
    }
  });

  it('releases the regions of a refused strict-sync write: the next write to them proceeds', async () => {
    const { splitter, legs } = setup('strict-sync', ['not streaming']);
    await expect(splitter.write(0, Buffer.alloc(4096), false)).rejects.toThrow(/strict-sync/);
    legs[0].outcome = 'acked';
    legs[0].state = 'InSync';
    // A leaked lock would leave this write waiting for ever (the test's timeout).
    await expect(splitter.write(0, Buffer.alloc(4096), false)).resolves.toBeUndefined();
    expect(legs[0].sent.length).toBe(1);
  });

  it('marks every peer and copies the regions back when the local write fails', async () => {
    const { splitter, local, legs, missed } = setup('sync', ['acked', 'acked']);
    local.fail = true;
    expect(await outcomeOf(splitter.write(0, Buffer.alloc(4096), false))).toBe(
      'LOCKSTEP_ERR_NO_SPACE',
    );
    expect(missed.map((m) => m.peer).sort()).toEqual(['peer-0', 'peer-1']);
    expect(legs.map((l) => l.resyncs)).toEqual([1, 1]);
  });

  it.each([
    ['sync', 'not streaming', 'ok'],
    ['strict-sync', 'not streaming', 'LOCKSTEP_ERR_IO'],
    ['sync', 'failed', 'ok'],
    ['strict-sync', 'failed', 'LOCKSTEP_ERR_IO'],
    ['sync', 'timed out', 'ok'],
  ] as const)('a flush in %s with a peer %s → %s', async (mode, outcome, reply) => {
    const { splitter, legs, events } = setup(mode, [outcome]);
    expect(await outcomeOf(splitter.flush())).toBe(reply);
    expect(events).toContain('local flush');
    expect(legs[0].failures.length).toBe(outcome === 'failed' ? 1 : 0);
  });

  it('drains a write still waiting for an overlapping one, not only the one in flight', async () => {
    // A snapshot cut after the drain must not miss a write that then goes on to the peers.
    const { splitter, legs } = setup('sync', ['acked']);
    let releaseFirst!: () => void;
    legs[0].hold = new Promise((r) => (releaseFirst = r));
    const first = splitter.write(0, Buffer.alloc(4096, 1), false);
    const second = splitter.write(4096, Buffer.alloc(4096, 2), false); // same region: waits
    let drained = false;
    const drain = splitter.drain().then(() => (drained = true));
    let releaseSecond!: () => void;
    legs[0].hold = new Promise((r) => (releaseSecond = r));
    releaseFirst();
    await first;
    await new Promise((r) => setImmediate(r));
    expect(legs[0].sent.length).toBe(2); // the second is on its way to the peer
    expect(drained).toBe(false);
    releaseSecond();
    await Promise.all([second, drain]);
    expect(drained).toBe(true);
  });

  it('lets a resync copy of a region wait for the async write still on its way there', async () => {
    const { splitter, legs } = setup('async', ['acked']);
    let release!: () => void;
    legs[0].hold = new Promise((r) => (release = r));
    await splitter.write(0, Buffer.alloc(4096), false);
    let copied = false;
    const copy = splitter.withRegionsLocked(0, 0, () => {
      copied = true;
      return Promise.resolve();
    });
    await new Promise((r) => setImmediate(r));
    expect(copied).toBe(false);
    release();
    await copy;
    expect(copied).toBe(true);
  });
});

describe('SendBatch', () => {
  it('runs the work queued after sends once every flush of the turn has run', async () => {
    const batch = new SendBatch();
    const order: string[] = [];
    const after = batch.afterSend(() => {
      order.push('local');
      return Promise.resolve();
    });
    const flushA = () => order.push('flush a');
    batch.send(flushA);
    batch.send(flushA);
    batch.send(() => order.push('flush b'));
    await after;
    expect(order).toEqual(['flush a', 'flush b', 'local']);
  });
});
