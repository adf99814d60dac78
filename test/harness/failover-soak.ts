// Rounds of faults against a relationship with a mediator and automatic failover, under a
// client that follows the primary (follow_writer.py): the primary SIGKILLed, the primary
// paused past the grace period, the link cut, the replica SIGKILLed, in turn. After every
// round the copies are back in sync; throughout, the mediator's records and the agents' status
// are watched for two primaries in one epoch; at the end every acknowledged write is read back
// from the primary and the copies compare identical. Used by the failover test (20 rounds) and
// by `npm run soak:failover -- --rounds N`.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type MediatorRecord } from '../../lib/mediator-client';
import type { AgentProcess } from './agent-process';
import { verifyAckedWrites } from './agent-process';
import { followWriterSummary, startFollowWriter, type FollowWriterSummary } from './follow-writer';
import { MediatorProcess } from './mediator-process';
import { waitFor } from './processes';
import { expectIdentical, inSync, ProxiedReplica, volumeStatus, waitPeer } from './replication';

export type RoundKind = 'kill-primary' | 'pause-primary' | 'cut-link' | 'kill-replica';
const KINDS: RoundKind[] = ['kill-primary', 'cut-link', 'pause-primary', 'kill-replica'];

export interface SoakResult {
  rounds: { kind: RoundKind; primaryAfter: string; epoch: number; ms: number }[];
  writer: FollowWriterSummary;
  /** Distinct slots the writer saw acknowledged (it writes its slots over and over). */
  ackedSlots: number;
  /** Of those, the ones read back intact from the final primary. */
  ackedVerified: number;
  /** Times two copies were seen accepting writes in the same epoch. */
  dualPrimaries: number;
  /** Records whose epoch went down, or an epoch seen with two primaries. */
  recordAnomalies: string[];
}

const GRACE = '2s';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Copy {
  agent: AgentProcess;
  /** How the other copy dials it: its name at the mediator. */
  address: string;
}

export async function soakFailover(
  rounds: number,
  log: (line: string) => void = () => undefined,
): Promise<SoakResult> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-soak-'));
  const mediator = await new MediatorProcess().start();
  const records = mediator.client(2_000);
  const links: ProxiedReplica[] = [];
  let watching = true;
  let watcher: Promise<void> = Promise.resolve();
  try {
    // Both agents behind proxies that they advertise: the link between them can be cut both
    // ways, whichever is primary, and each has one name at the mediator.
    for (const node of ['soak-a', 'soak-b']) links.push(await ProxiedReplica.start(node, [], true));
    const a = links[0].agent;
    const copies: Copy[] = links.map((l) => ({ agent: l.agent, address: l.address }));
    await a.createVolume('v', '1GiB');
    await a.ctl(
      'replicate',
      'v',
      '--to',
      copies[1].address,
      '--mediator',
      mediator.address,
      '--group',
      'v',
      '--grace',
      GRACE,
    );
    let primary = copies[0];
    let replica = copies[1];
    const asPeer = (c: Copy) => ({ grpcAddress: c.address, node: c.agent.node }) as AgentProcess;
    const settled = async () => {
      await waitPeer(primary.agent, 'v', asPeer(replica), inSync, 'in sync', 120_000);
      await waitFor(
        'the mediator to count the replica in sync',
        async () =>
          (await records.record('v')).inSync.includes(replica.address) ? true : undefined,
        30_000,
      );
    };
    await settled();

    const seen = new Map<number, string>();
    const anomalies: string[] = [];
    let lastEpoch = 0;
    const note = (r: MediatorRecord) => {
      if (r.epoch < lastEpoch) anomalies.push(`epoch went from ${lastEpoch} down to ${r.epoch}`);
      lastEpoch = Math.max(lastEpoch, r.epoch);
      const holder = seen.get(r.epoch);
      if (holder !== undefined && holder !== r.primary)
        anomalies.push(`epoch ${r.epoch} granted to ${holder} and to ${r.primary}`);
      seen.set(r.epoch, r.primary);
    };
    // Two copies holding writes in one epoch would be a split brain: looked for all along.
    let dualPrimaries = 0;
    const clients = copies.map((c) => c.agent.client(1_000));
    watcher = (async () => {
      while (watching) {
        const views = await Promise.all(
          clients.map((c) =>
            c.getVolume('v').then(
              (v) => v.replication?.protection,
              () => undefined,
            ),
          ),
        );
        const holding = views.filter((p) => p?.state === 'holding');
        if (holding.length === 2 && holding[0]!.epoch === holding[1]!.epoch) dualPrimaries++;
        await records.record('v').then(note, () => undefined);
        await sleep(200);
      }
      for (const c of clients) c.close();
    })();

    const ackedLog = path.join(dir, 'acked.log');
    const stop = path.join(dir, 'stop');
    const writer = startFollowWriter(
      'soak-writer',
      copies.map((c) => c.agent.uri('v')),
      ackedLog,
      stop,
      4,
      // 16 MiB written over and over: each failover resyncs what it changed, not gigabytes.
      4096,
      true,
    );
    const done: SoakResult['rounds'] = [];
    for (let i = 0; i < rounds; i++) {
      const kind = KINDS[i % KINDS.length];
      const started = Date.now();
      await sleep(300); // some writes before the fault
      switch (kind) {
        case 'kill-primary':
          await primary.agent.kill('SIGKILL');
          await promoted(replica);
          await primary.agent.start();
          [primary, replica] = [replica, primary];
          break;
        case 'pause-primary':
          primary.agent.proc.child.kill('SIGSTOP');
          await promoted(replica);
          primary.agent.proc.child.kill('SIGCONT');
          [primary, replica] = [replica, primary];
          break;
        case 'cut-link': {
          for (const l of links) l.setMode('blackhole');
          // Past the replica's grace: it lost its primary, and must not take over.
          await sleep(5_000);
          const v = await volumeStatus(replica.agent, 'v');
          if (v.role !== 'secondary')
            throw new Error(`the replica took over on a link cut (round ${i + 1})`);
          for (const l of links) {
            l.setMode('pass');
            l.dropAll();
          }
          break;
        }
        case 'kill-replica':
          await replica.agent.kill('SIGKILL');
          await sleep(1_000);
          await replica.agent.start();
          break;
      }
      await settled();
      const r = await records.record('v');
      note(r);
      if (r.primary !== primary.address)
        throw new Error(
          `round ${i + 1} (${kind}): the mediator names ${r.primary}, not ${primary.address}`,
        );
      done.push({
        kind,
        primaryAfter: primary.agent.node,
        epoch: r.epoch,
        ms: Date.now() - started,
      });
      log(
        `round ${i + 1}/${rounds} ${kind}: primary ${primary.agent.node}, epoch ${r.epoch}, ${Date.now() - started} ms`,
      );
    }
    writeFileSync(stop, '');
    const summary = await followWriterSummary(writer).catch((err: Error) => {
      // Writes failed with EIO (a fenced primary's, a suspended one's) are not acknowledged,
      // and they are allowed: the summary is what counts.
      const last = /\{.*\}\s*$/.exec(err.message);
      if (!last) throw err;
      return JSON.parse(last[0]) as FollowWriterSummary;
    });
    await settled();
    watching = false;
    await watcher;
    const ackedSlots = new Set(
      readFileSync(ackedLog, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((line) => line.split(' ')[0]),
    ).size;
    const ackedVerified = await verifyAckedWrites(primary.agent.uri('v'), ackedLog);
    await expectIdentical(primary.agent, replica.agent, 'v');
    return {
      rounds: done,
      writer: summary,
      ackedSlots,
      ackedVerified,
      dualPrimaries,
      recordAnomalies: anomalies,
    };
  } finally {
    watching = false;
    await watcher.catch(() => undefined);
    records.close();
    for (const l of links) {
      await l.close();
      await l.agent.dispose();
    }
    await mediator.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function promoted(c: Copy): Promise<void> {
  await waitFor(
    `${c.agent.node} to take over`,
    async () => {
      const v = (await volumeStatus(c.agent, 'v')) as unknown as {
        role: string;
        replication: { protection: { acceptsWrites: boolean } };
      };
      return v.role === 'primary' && v.replication.protection.acceptsWrites ? true : undefined;
    },
    30_000,
  );
}
