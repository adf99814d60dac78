// A client's FLUSH on a replicated volume, as a database issues one per commit: each copy pays
// one fdatasync for it (counted by the agents' lockstep_volume_syncs_total), and every write
// the client saw flushed survives SIGKILL of both agents on both copies.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import {
  AgentProcess,
  run,
  startAckWriter,
  systemPython,
  verifyAckedWrites,
} from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import { expectIdentical, inSync, waitPeer } from '../harness/replication';

/** `count` pairs of a 4 KiB write and a FLUSH, one request at a time, through libnbd. */
const COMMIT_LOOP = `
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(bytes([i % 251]) * 4096, (i * 7919 % 16384) * 4096)
    h.flush()
h.shutdown()
print("ok")
`;

async function syncs(agent: AgentProcess, volume: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();
  const m = new RegExp(
    `^lockstep_volume_syncs_total\\{volume="${volume}"[^}]*\\} (\\d+)$`,
    'm',
  ).exec(text);
  if (!m) throw new Error(`no lockstep_volume_syncs_total for ${volume} on ${agent.node}`);
  return Number(m[1]);
}

describe('FLUSH on a replicated volume', () => {
  const agents: AgentProcess[] = [];
  const start = (node: string) => {
    const a = new AgentProcess({ node, metrics: true, extraArgs: ['--peer-timeout', '1500'] });
    agents.push(a);
    return a.start();
  };
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
  });

  async function pair(mode: string): Promise<[AgentProcess, AgentProcess, string]> {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '64MiB');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--mode', mode);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    return [a, b, uri];
  }

  it.each(['sync', 'async'])(
    'costs each copy one fdatasync per client FLUSH in %s mode, whatever the number of lanes',
    async (mode) => {
      const [a, b, uri] = await pair(mode);
      const commits = 200;
      const [a0, b0] = [await syncs(a, 'v'), await syncs(b, 'v')];
      expect((await run(systemPython, ['-c', COMMIT_LOOP, uri, String(commits)])).trim()).toBe(
        'ok',
      );
      // One at a time, no flush can share another's fdatasync: one each, on each copy (a few
      // more if the link flapped and a catch-up flushed the replica).
      for (const [agent, before] of [
        [a, a0],
        [b, b0],
      ] as const) {
        const made = (await syncs(agent, 'v')) - before;
        expect(made).toBeGreaterThanOrEqual(commits);
        expect(made).toBeLessThanOrEqual(commits + 5);
      }
    },
  );

  it('has every write the client saw flushed on both copies after SIGKILL of both agents', async () => {
    const [a, b, uri] = await pair('sync');
    const log = path.join(a.dataDir, 'flushed.log');
    // A FLUSH after every 8 writes, 16 requests in flight, until the primary dies.
    const writer = startAckWriter(uri, log, 100_000, 16, 8192, 8);
    await waitFor(
      '1000 flushed writes',
      () =>
        Promise.resolve(
          (existsSync(log) && readFileSync(log, 'utf8').split('\n').length > 1000) || undefined,
        ),
      60_000,
      20,
    );
    await a.kill('SIGKILL');
    await b.kill('SIGKILL');
    expect(await writer).toMatch(/connection lost/);

    await b.start(); // the secondary's export serves its copy read-only
    expect(await verifyAckedWrites(b.uri('v'), log)).toBeGreaterThan(1000);
    await a.start();
    expect(await verifyAckedWrites(a.uri('v'), log)).toBeGreaterThan(1000);
    await waitPeer(a, 'v', b, inSync, 'in sync again');
    await expectIdentical(a, b, 'v');
  });
});
