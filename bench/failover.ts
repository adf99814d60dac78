// Failover through a mediator, with the default settings (peer timeout 5 s, grace 5 s), two
// agents and a mediator on this machine, a 4 KiB writer at queue depth 1 on the primary:
//   - unplanned failover: the primary SIGKILLed → the replica promoted by itself and its
//     export acknowledging a write (target p50 ≤ 8 s, p99 ≤ 15 s; NetApp suspends I/O 20-50 s,
//     DRBD's default timeout is 6 s);
//   - the write stall when the replica is SIGKILLed: the slowest write around the kill, which
//     waits for the mediator to grant the primary an epoch without the replica (target
//     p99 ≤ 4 s); and when it goes silent instead (its proxy drops everything: a partition or
//     a power loss, no FIN), where the peer timeout comes first;
//   - a planned switchover under a writer (demote the primary, promote the replica through the
//     mediator, over the agents' API as the operator does when spec.primary changes): the longest a 4 KiB qd1 writer
//     that follows the primary waits, from its last acknowledged write on the old primary to
//     its first on the new one, and the writes that failed with an I/O error on the way
//     (target p99 ≤ 1 s, zero errors).
// Each round uses a new pair of agents and its own group at one mediator.
import { NbdClient, NbdRequestError } from '../lib/nbd-client';
import { AgentProcess } from '../test/harness/agent-process';
import { MediatorProcess } from '../test/harness/mediator-process';
import { waitFor } from '../test/harness/processes';
import { percentile, Qd1Writer } from '../test/harness/qd1-writer';
import { inSync, ProxiedReplica, volumeStatus, waitPeer } from '../test/harness/replication';

export interface FailoverResult {
  rounds: number;
  failoverMs: number[];
  stallMs: number[];
  /** The replica gone silent (a partition, a power loss): no FIN, only the peer timeout. */
  silentStallMs: number[];
  /** A planned switchover: the follower's longest wait, and writes failed with an error. */
  switchoverMs: number[];
  switchoverErrors: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function pair(m: MediatorProcess, group: string, proxied?: ProxiedReplica) {
  const a = await new AgentProcess({ node: 'bench-a' }).start();
  const b = proxied?.agent ?? (await new AgentProcess({ node: 'bench-b' }).start());
  const bAddress = proxied?.address ?? b.grpcAddress;
  await a.createVolume('v', '64MiB');
  await a.ctl('replicate', 'v', '--to', bAddress, '--mediator', m.address, '--group', group);
  await waitPeer(a, 'v', proxied?.asPeer ?? b, inSync, 'in sync', 60_000);
  const client = m.client();
  try {
    await waitFor(
      'the replica counted in sync',
      async () => ((await client.record(group)).inSync.includes(bAddress) ? true : undefined),
      30_000,
      50,
    );
  } finally {
    client.close();
  }
  return { a, b };
}

/** Primary SIGKILLed → the replica's export acknowledges a write, in ms. */
async function failoverOnce(m: MediatorProcess, group: string): Promise<number> {
  const { a, b } = await pair(m, group);
  try {
    const writer = await Qd1Writer.start(a.nbdSocket, 'v', 16 << 20);
    await sleep(500);
    const killedAt = performance.now();
    await a.kill('SIGKILL');
    await writer.stop().catch(() => undefined);
    await waitFor(
      'the replica to take over',
      async () => {
        const v = (await volumeStatus(b, 'v')) as unknown as {
          replication: { protection: { acceptsWrites: boolean } };
        };
        return v.replication.protection.acceptsWrites || undefined;
      },
      60_000,
      20,
    );
    const client = await NbdClient.connect({ socketPath: b.nbdSocket }, 'v', { timeoutMs: 60_000 });
    try {
      await client.write(0, Buffer.alloc(4096, 1));
    } finally {
      await client.close();
    }
    return performance.now() - killedAt;
  } finally {
    await a.dispose();
    await b.dispose();
  }
}

/** A qd1 writer on the primary; `fault` half a second in; the slowest write from it on, in ms. */
async function slowestWriteAround(
  primary: AgentProcess,
  fault: () => unknown,
  afterMs: number,
): Promise<number> {
  const writer = await Qd1Writer.start(primary.nbdSocket, 'v', 16 << 20);
  await sleep(500);
  const from = writer.count;
  await fault();
  await sleep(afterMs);
  const latencies = await writer.stop();
  return Math.max(...latencies.slice(from));
}

/** Replica SIGKILLed under a qd1 writer → the slowest write from the kill on, in ms. */
async function stallOnce(m: MediatorProcess, group: string): Promise<number> {
  const { a, b } = await pair(m, group);
  try {
    return await slowestWriteAround(a, () => b.kill('SIGKILL'), 3_000);
  } finally {
    await a.dispose();
    await b.dispose();
  }
}

/** Replica cut off silently (its proxy drops everything) under a qd1 writer: the slowest write. */
async function silentStallOnce(m: MediatorProcess, group: string): Promise<number> {
  const link = await ProxiedReplica.start('bench-b');
  const { a, b } = await pair(m, group, link);
  try {
    return await slowestWriteAround(a, () => link.setMode('blackhole'), 8_000);
  } finally {
    await link.close();
    await a.dispose();
    await b.dispose();
  }
}

/** ESHUTDOWN: the server is going away (a demoted primary), the write goes to the next one. */
const ESHUTDOWN = 108;

/**
 * A qd1 writer that follows the primary: a write lost with its connection, or refused with
 * ESHUTDOWN, is sent again to whichever export takes writes; any other error is counted.
 */
class FollowingWriter {
  errors = 0;
  /** The longest time from one acknowledged write to the next, in ms. */
  longestGapMs = 0;
  private stopping = false;
  private readonly loop: Promise<void>;

  constructor(private readonly sockets: string[]) {
    this.loop = this.run();
  }

  private async writable(): Promise<NbdClient> {
    for (;;) {
      for (const socketPath of this.sockets) {
        const c = await NbdClient.connect({ socketPath }, 'v', { timeoutMs: 10_000 }).catch(
          () => undefined,
        );
        if (c && !c.readOnly) return c;
        await c?.close();
      }
      await sleep(5);
    }
  }

  private async run(): Promise<void> {
    const data = Buffer.alloc(4096, 7);
    let client = await this.writable();
    let last = performance.now();
    while (!this.stopping) {
      const offset = Math.floor(Math.random() * 4096) * 4096;
      try {
        await client.write(offset, data);
        const now = performance.now();
        this.longestGapMs = Math.max(this.longestGapMs, now - last);
        last = now;
      } catch (err) {
        if (err instanceof NbdRequestError && err.errno !== ESHUTDOWN) this.errors++;
        await client.close().catch(() => undefined);
        client = await this.writable();
      }
    }
    await client.close();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
  }
}

/** A planned switchover from A to B under a following writer: its longest wait, its errors. */
async function switchoverOnce(m: MediatorProcess, group: string) {
  const { a, b } = await pair(m, group);
  try {
    const writer = new FollowingWriter([a.nbdSocket, b.nbdSocket]);
    let steps = { demoteMs: 0, promoteMs: 0 };
    // Over the agents' API, as the operator switches (ctl would add two process starts).
    const [ca, cb] = [a.client(), b.client()];
    try {
      await sleep(500);
      const t0 = performance.now();
      await ca.demote('v');
      const t1 = performance.now();
      await cb.promote('v');
      steps = { demoteMs: t1 - t0, promoteMs: performance.now() - t1 };
      await sleep(1_000);
      await writer.stop();
    } finally {
      ca.close();
      cb.close();
    }
    return { stallMs: writer.longestGapMs, errors: writer.errors, ...steps };
  } finally {
    await a.dispose();
    await b.dispose();
  }
}

export async function failoverRun(rounds: number): Promise<FailoverResult> {
  const m = await new MediatorProcess().start();
  try {
    const failoverMs: number[] = [];
    const stallMs: number[] = [];
    const silentStallMs: number[] = [];
    const switchoverMs: number[] = [];
    let switchoverErrors = 0;
    for (let i = 0; i < rounds; i++) {
      const sw = await switchoverOnce(m, `bench-switchover-${i}`);
      switchoverMs.push(sw.stallMs);
      switchoverErrors += sw.errors;
      failoverMs.push(await failoverOnce(m, `bench-failover-${i}`));
      stallMs.push(await stallOnce(m, `bench-stall-${i}`));
      silentStallMs.push(await silentStallOnce(m, `bench-silent-${i}`));
      process.stderr.write(
        `failover round ${i + 1}/${rounds}: failover ${failoverMs[i].toFixed(0)} ms, ` +
          `stall ${stallMs[i].toFixed(0)} ms, silent stall ${silentStallMs[i].toFixed(0)} ms, ` +
          `switchover ${sw.stallMs.toFixed(0)} ms (demote ${sw.demoteMs.toFixed(0)} ms, ` +
          `promote ${sw.promoteMs.toFixed(0)} ms, ${sw.errors} errors)\n`,
      );
    }
    return { rounds, failoverMs, stallMs, silentStallMs, switchoverMs, switchoverErrors };
  } finally {
    await m.dispose();
  }
}

export function failoverReport(r: FailoverResult): string {
  const s = (xs: number[], p: number) => (percentile(xs, p) / 1000).toFixed(2);
  return (
    `failover rounds=${r.rounds} unplanned_p50_s=${s(r.failoverMs, 50)} unplanned_p99_s=${s(r.failoverMs, 99)} ` +
    `replica_death_stall_p50_s=${s(r.stallMs, 50)} replica_death_stall_p99_s=${s(r.stallMs, 99)} ` +
    `replica_silent_stall_p50_s=${s(r.silentStallMs, 50)} replica_silent_stall_p99_s=${s(r.silentStallMs, 99)} ` +
    `switchover_stall_p50_s=${s(r.switchoverMs, 50)} switchover_stall_p99_s=${s(r.switchoverMs, 99)} ` +
    `switchover_errors=${r.switchoverErrors}`
  );
}
