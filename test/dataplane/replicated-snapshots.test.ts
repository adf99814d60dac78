// Snapshots at one write-order point, seen through real clients: a consistency group's snapshot
// never holds a write without the writes it depended on (with and without hold, on one agent
// and with members replicated to another), a replicated snapshot is the same on every copy under a running workload and
// verification finds exactly the region where a copy was changed behind its back, a copy that
// could not take a snapshot says so, and deleting one deletes it everywhere.
import { execFile } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readSync, writeSync } from 'node:fs';
import path from 'node:path';
import type { AgentClient } from '../../lib/agent-client';
import { type Verification } from '../../lib/agent-client';
import { ADMIN, type AgentProcess, lockstepBin, run } from '../harness/agent-process';
import { tlsDirFor } from '../harness/test-certificates';
import { readSequences, startCausalWriter, type CausalWriter } from '../harness/causal-writer';
import { waitFor } from '../harness/processes';
import { dataFile, replicationAgent } from '../harness/replication';
import type { PeerStatus__Output as PeerStatus } from '../../proto/gen/lockstep/v1/PeerStatus';
import { productNode } from '../harness/product-runtime';

const MiB = 1024 * 1024;
/** Snapshots read and deleted together, while the next ones are taken. */
const BATCH = 40;
/** Group snapshots are taken for this long, or longer (up to twice) until there are enough. */
const SNAPSHOT_FOR_MS = 6_000;
const ENOUGH_SNAPSHOTS = 100;

/** `lockstep ctl` with its exit code, which says something (verify exits 2 when copies differ). */
async function ctlWithCode(
  agent: AgentProcess,
  ...args: string[]
): Promise<{ code: number; out: string }> {
  const tlsDir = await tlsDirFor(ADMIN);
  return new Promise((resolve) =>
    execFile(
      productNode(),
      [lockstepBin, 'ctl', '--agent', agent.grpcAddress, '--tls-dir', tlsDir, ...args],
      (err, stdout, stderr) =>
        resolve({ code: err ? Number((err as { code?: number }).code) : 0, out: stdout + stderr }),
    ),
  );
}

/** Inverts one byte of a file (an agent's copy changed behind its back). */
function flipByte(file: string, offset: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] ^= 0xff;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
}

/** The saved-data log of a volume's snapshot, found by the name in its header. */
function snapshotLog(agent: AgentProcess, volume: string, name: string): string {
  const dir = path.join(agent.dataDir, 'volumes', volume, 'snapshots');
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.log'))) {
    const header = readFileSync(path.join(dir, file)).subarray(0, 4096);
    const json = header.subarray(16, 16 + header.readUInt32LE(8)).toString('utf8');
    if ((JSON.parse(json) as { name: string }).name === name) return path.join(dir, file);
  }
  throw new Error(`no log of snapshot ${volume}@${name} on ${agent.node}`);
}

/**
 * Where the first saved data block of a snapshot's log is: its offset in the file and the
 * volume block it saved (layout in sidecar/src/snapshots/saved-log.ts).
 */
function firstSavedBlock(logFile: string): { fileOffset: number; block: number } {
  const fd = openSync(logFile, 'r');
  try {
    const head = Buffer.alloc(16);
    readSync(fd, head, 0, 16, 4096);
    if (head.readUInt32LE(0) !== 0x4c535231) throw new Error(`${logFile} has no record`);
    const count = head.readUInt32LE(4);
    const entries = Buffer.alloc(count * 8);
    readSync(fd, entries, 0, entries.length, 4096 + 24);
    for (let i = 0; i < count; i++) {
      if ((entries.readUInt16LE(i * 8 + 6) & 1) === 0)
        return { fileOffset: 4096 + 24 + count * 8, block: entries.readUIntLE(i * 8, 6) };
    }
    throw new Error(`${logFile}: the first record saved only zeroes`);
  } finally {
    closeSync(fd);
  }
}

function copyOf(v: Verification, agent: AgentProcess) {
  const c = v.copies.find((x) => x.address === agent.grpcAddress);
  if (!c) throw new Error(`${agent.node} is not among the copies: ${JSON.stringify(v)}`);
  return c;
}

describe('replicated snapshots and consistency groups', () => {
  const agents: AgentProcess[] = [];
  const clients: AgentClient[] = [];
  const writers: CausalWriter[] = [];
  const start = async (node: string) => {
    const a = replicationAgent(node);
    agents.push(a);
    return a.start();
  };
  const clientOf = (agent: AgentProcess) => {
    const c = agent.client(30_000);
    clients.push(c);
    return c;
  };
  afterEach(async () => {
    for (const w of writers.splice(0)) w.kill();
    for (const c of clients.splice(0)) c.close();
    for (const a of agents.splice(0)) await a.dispose();
  });

  /** A peer's state as the primary sees it (through the API: no ctl process per poll). */
  function waitPeerApi(
    client: AgentClient,
    volume: string,
    peer: AgentProcess,
    ok: (p: PeerStatus) => boolean,
    what: string,
  ): Promise<PeerStatus> {
    return waitFor(
      `${peer.node} ${what}`,
      async () => {
        const v = await client.getVolume(volume);
        const p = v.replication?.peers.find((x) => x.address === peer.grpcAddress);
        return p && ok(p) ? p : undefined;
      },
      60_000,
      100,
    );
  }
  const inSync = (p: PeerStatus) => p.state === 'InSync' && p.dirtyBytes === 0;

  async function replicate(client: AgentClient, volume: string, to: AgentProcess): Promise<void> {
    await client.replicate({
      name: volume,
      targets: [to.grpcAddress],
      mode: 'sync',
      regionSize: 64 * 1024,
      maxResyncBytesPerSecond: 0,
    });
    await waitPeerApi(client, volume, to, inSync, 'in sync');
  }

  /** Agents a and b, volume v on a replicated to b; with a's client. */
  async function pair(): Promise<[AgentProcess, AgentProcess, AgentClient]> {
    const [a, b] = await Promise.all([start('node-a'), start('node-b')]);
    const client = clientOf(a);
    await client.createVolume('v', 64 * MiB);
    await replicate(client, 'v', b);
    return [a, b, client];
  }

  // Two volumes on one agent; then with the second replicated and a third member, replicated
  // too, cut between them: its round trip to its peer lets time pass between the first cut and
  // the last, as a larger group's would, so a write answered in that time would be seen.
  describe.each([
    ['with hold', false, false],
    ['without hold', true, false],
    ['with hold, replicated members', false, true],
    ['without hold, replicated members', true, true],
  ])('a group snapshot %s', (_title, noHold, replicated) => {
    it('never holds a write without the writes it depended on, while the writer keeps going', async () => {
      const [a, b] = await Promise.all([start('node-a'), replicated ? start('node-b') : undefined]);
      const client = clientOf(a);
      const members = b ? ['v1', 'r', 'v2'] : ['v1', 'v2'];
      for (const v of members) await client.createVolume(v, 16 * MiB);
      if (b) for (const v of ['r', 'v2']) await replicate(client, v, b);
      await client.createGroup('g', members);
      const writer = await startCausalWriter(a.uri('v1'), a.uri('v2'));
      writers.push(writer);

      // Each snapshot's sequence numbers: v1, v2, and v2's replica copy.
      const seen: { name: string; s1: number; s2: number; r2?: number }[] = [];
      const readAndDelete = async (names: string[]) => {
        const uris = [
          ...names.map((n) => a.uri(`v1@${n}`)),
          ...names.map((n) => a.uri(`v2@${n}`)),
          ...(b ? names.map((n) => b.uri(`v2@${n}`)) : []),
        ];
        const seq = await readSequences(uris);
        const k = names.length;
        names.forEach((name, i) =>
          seen.push({ name, s1: seq[i], s2: seq[k + i], r2: b ? seq[2 * k + i] : undefined }),
        );
        for (const name of names)
          for (const v of members) await client.deleteSnapshot(v, name, true);
      };
      let processing = Promise.resolve();
      let batch: string[] = [];
      const started = Date.now();
      const more = (i: number) => {
        const ms = Date.now() - started;
        return ms < SNAPSHOT_FOR_MS || (i < ENOUGH_SNAPSHOTS && ms < 2 * SNAPSHOT_FOR_MS);
      };
      for (let i = 0; more(i); i++) {
        const name = `s${i}`;
        const taken = await client.snapshotGroup('g', name, { noHold });
        expect(taken.snapshots.map((s) => s.volume)).toEqual(members);
        for (const s of taken.snapshots)
          expect(s.copies.every((c) => c.state === 'Taken')).toBe(true);
        expect(taken.snapshots.at(-1)!.copies).toHaveLength(b ? 2 : 1);
        batch.push(name);
        if (batch.length === BATCH) {
          const names = batch;
          batch = [];
          processing = processing.then(() => readAndDelete(names));
        }
      }
      const writes = await writer.stop();
      await processing;
      await readAndDelete(batch);

      expect(seen.length).toBeGreaterThanOrEqual(50);
      // At one write-order point the writer had written (n, n) or (n, n - 1).
      const some = (rows: typeof seen) => ({ count: rows.length, first: rows.slice(0, 5) });
      const none = { count: 0, first: [] };
      expect(some(seen.filter((s) => s.s2 > s.s1 || s.s1 - s.s2 > 1))).toEqual(none);
      // Every copy of a replicated snapshot holds the same.
      if (b) expect(some(seen.filter((s) => s.r2 !== s.s2))).toEqual(none);
      // Taken one after the other, so never going back; and the writer went on throughout.
      expect(some(seen.filter((s, i) => i > 0 && s.s1 < seen[i - 1].s1))).toEqual(none);
      const quarter = Math.floor(seen.length / 4);
      const marks = [0, 1, 2, 3].map((q) => seen[q * quarter].s1);
      marks.push(seen[seen.length - 1].s1);
      for (let q = 1; q < marks.length; q++) expect(marks[q]).toBeGreaterThan(marks[q - 1]);
      expect(writes).toBeGreaterThanOrEqual(marks[4]);
      expect(await client.listSnapshots()).toEqual([]);
      if (b) expect(await clientOf(b).listSnapshots()).toEqual([]);
    });
  });

  it('is identical on both copies under fio, and verification finds exactly the region changed behind a copy’s back', async () => {
    const [a, b, client] = await pair();
    const uri = a.uri('v');
    // A region every snapshot reads from the volume file (never overwritten after them).
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 48m 1m', uri]);
    const fio = run('fio', [
      '--name=snapshots-under-load',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=32M',
      '--time_based',
      '--runtime=4',
    ]);
    let fioDone = false;
    void fio.finally(() => (fioDone = true)).catch(() => undefined);
    const names: string[] = [];
    await new Promise((r) => setTimeout(r, 500));
    while (!fioDone && names.length < 8) {
      const name = `f${names.length}`;
      const taken = await client.createSnapshot('v', name);
      expect(taken.copies.map((c) => [c.node, c.state])).toEqual([
        ['node-a', 'Taken'],
        ['node-b', 'Taken'],
      ]);
      names.push(name);
      await new Promise((r) => setTimeout(r, 300));
    }
    await fio;
    expect(names.length).toBeGreaterThanOrEqual(4);
    await waitPeerApi(client, 'v', b, inSync, 'in sync');
    // fio wrote between them: their logs hold saved data, on both copies, and verification
    // reads through them.
    for (const agent of [a, b]) {
      const saving = (await clientOf(agent).listSnapshots('v')).filter(
        (s) => names.slice(0, -1).includes(s.name) && s.savedBytes > 0,
      );
      expect(saving.length).toBeGreaterThanOrEqual(2);
    }
    // Every snapshot verifies identical; the first, a middle and the last also compare so
    // through their exports (each qemu-img run costs a second or two on a busy machine).
    const compared = [names[0], names[names.length >> 1], names[names.length - 1]];
    for (const name of names) {
      const v = await client.verifySnapshot('v', name);
      expect({
        name,
        copies: v.copies.map((c) => [c.state, c.reason, c.differingOffsets]),
      }).toEqual({
        name,
        copies: [
          ['Identical', '', []],
          ['Identical', '', []],
        ],
      });
      expect(v.identical).toBe(true);
      if (!compared.includes(name)) continue;
      await run('qemu-img', [
        'compare',
        '-f',
        'raw',
        '-F',
        'raw',
        a.uri(`v@${name}`),
        b.uri(`v@${name}`),
      ]);
    }
    const verified = await ctlWithCode(a, 'verify', 'v', names[0], '-o', 'json');
    expect(verified.code).toBe(0);
    expect(JSON.parse(verified.out)).toMatchObject({ identical: true, regionSize: MiB });

    // A snapshot whose log (on each copy) saves 0x11 blocks as they are overwritten; the
    // earlier snapshots read zeroes there, saved in the log of the last of them.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 50m 64k', uri]);
    expect((await client.createSnapshot('v', 't')).copies.every((c) => c.state === 'Taken')).toBe(
      true,
    );
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 50m 64k', uri]);
    await waitPeerApi(client, 'v', b, inSync, 'in sync');
    const logFile = snapshotLog(b, 'v', 't');

    await b.stop();
    flipByte(dataFile(b, 'v'), 48 * MiB + 12_345);
    const saved = firstSavedBlock(logFile);
    expect(Math.floor((saved.block * 4096) / MiB)).toBe(50);
    flipByte(logFile, saved.fileOffset + 100);
    await b.start(); // digests are recomputed from what is on disk now
    await waitPeerApi(client, 'v', b, inSync, 'in sync again');

    // Every snapshot reads 48m from the volume file: that region, and nothing else, differs.
    for (const name of [names[0], names[names.length - 1]]) {
      const v = await client.verifySnapshot('v', name);
      expect(v.identical).toBe(false);
      expect(copyOf(v, a).state).toBe('Identical');
      expect(copyOf(v, b)).toMatchObject({ state: 'Differs', differingOffsets: [48 * MiB] });
    }
    // The damaged saved block: t's copy on b differs there too.
    const v = await client.verifySnapshot('v', 't');
    expect(copyOf(v, b)).toMatchObject({
      state: 'Differs',
      differingOffsets: [48 * MiB, 50 * MiB],
    });
    const cli = await ctlWithCode(a, 'verify', 'v', 't', '-o', 'json');
    expect(cli.code).toBe(2);
    const json = JSON.parse(cli.out) as Verification;
    expect(json.identical).toBe(false);
    expect(copyOf(json, b).differingOffsets).toEqual([48 * MiB, 50 * MiB]);
  });

  it('lists a copy that is out of sync as missing the snapshot, and verification says so', async () => {
    const [a, b, client] = await pair();
    const uri = a.uri('v');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 1m', uri]);
    await b.kill('SIGKILL');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 1m 1m', uri]);
    await waitPeerApi(client, 'v', b, (p) => p.state !== 'InSync', 'out of sync');

    const taken = JSON.parse(await a.ctl('snapshot', 'create', 'v', 'm', '-o', 'json')) as {
      copies: { address: string; state: string; reason: string }[];
    };
    expect(taken.copies.map((c) => [c.address, c.state])).toEqual([
      [a.grpcAddress, 'Taken'],
      [b.grpcAddress, 'Missing'],
    ]);
    expect(taken.copies[1].reason).toMatch(/^peer is (?!InSync)\w+/);

    const down = await ctlWithCode(a, 'verify', 'v', 'm', '-o', 'json');
    expect(down.code).toBe(2);
    const whileDown = JSON.parse(down.out) as Verification;
    expect(whileDown.identical).toBe(false);
    expect(copyOf(whileDown, b)).toMatchObject({ state: 'Missing', differingOffsets: [] });
    expect(copyOf(whileDown, b).reason).not.toBe('');

    // Back in sync, it still lacks the snapshot (it was not there at the cut) and says so.
    await b.start();
    await waitPeerApi(client, 'v', b, inSync, 'in sync again');
    const back = await client.verifySnapshot('v', 'm');
    expect(copyOf(back, b)).toMatchObject({ state: 'Missing', differingOffsets: [] });
    expect(copyOf(back, b).reason).toMatch(/no snapshot "m"/);
    expect(await clientOf(b).listSnapshots('v')).toEqual([]);

    // The next snapshot is on both copies again.
    const next = await client.createSnapshot('v', 'n');
    expect(next.copies.map((c) => c.state)).toEqual(['Taken', 'Taken']);
    expect((await client.verifySnapshot('v', 'n')).identical).toBe(true);
  });

  it('deletes a replicated snapshot from every copy when it is deleted on the primary', async () => {
    const [a, b, client] = await pair();
    await a.ctl('snapshot', 'create', 'v', 'd');
    await client.createSnapshot('v', 'keep');
    const names = async (agent: AgentProcess) =>
      (await clientOf(agent).listSnapshots('v')).map((s) => s.name);
    expect(await names(b)).toEqual(['d', 'keep']);
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', b.uri('v@d')]);

    await a.ctl('snapshot', 'delete', 'v', 'd');
    expect(await names(a)).toEqual(['keep']);
    expect(await names(b)).toEqual(['keep']);
    await expect(
      run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', b.uri('v@d')]),
    ).rejects.toThrow();
  });
});
