// Synchronous replication between real agent processes: every acknowledged write survives the
// loss of either copy, resync sends what was missed and not the volume, failures never hang a
// write beyond the peer timeout, and the copies compare identical afterwards.
import { closeSync, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import { fioVerify, run, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { ackedCount, followWriterSummary, startFollowWriter } from '../harness/follow-writer';
import { waitFor } from '../harness/processes';
import {
  dataFile,
  expectIdentical,
  inSync,
  peerOf,
  ProxiedReplica,
  replicationAgent,
  volumeStatus,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;

async function ackedLines(log: string, atLeast: number): Promise<void> {
  await waitFor(
    `${atLeast} acknowledged writes`,
    () =>
      Promise.resolve(
        (existsSync(log) && readFileSync(log, 'utf8').split('\n').length > atLeast) || undefined,
      ),
    60_000,
    20,
  );
}

describe('synchronous replication', () => {
  const agents: AgentProcess[] = [];
  const start = async (node: string, extra: string[] = []) => {
    const a = replicationAgent(node, extra);
    agents.push(a);
    return a.start();
  };
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
  });

  async function pair(
    size = '64MiB',
    mode = 'sync',
  ): Promise<[AgentProcess, AgentProcess, string]> {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', size);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--mode', mode);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    return [a, b, uri];
  }

  it('keeps the replica identical under fio with crc32c verification, and serves it read-only', async () => {
    const [a, b, uri] = await pair();
    await fioVerify(uri, '64M');
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await expectIdentical(a, b, 'v');
    const replica = await volumeStatus(b, 'v');
    expect(replica).toMatchObject({ role: 'secondary', readOnly: true });
    expect(replica.replication?.primaryConnected).toBe(true);
    await expect(
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', b.uri('v')]),
    ).rejects.toThrow();
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 64k', b.uri('v')]);
  });

  it('sends a client that follows the primary to the new one at a planned switchover, without an I/O error', async () => {
    const [a, b] = await pair();
    const log = path.join(a.dataDir, 'follow-acked.log');
    const stop = path.join(a.dataDir, 'follow-stop');
    const writer = startFollowWriter(
      'follower',
      [a.uri('v'), b.uri('v')],
      log,
      stop,
      8,
      2048,
      true,
    );
    await ackedLines(log, 300);
    await a.ctl('demote', 'v');
    await b.ctl('promote', 'v');
    const before = ackedCount(log);
    await waitFor(
      'writes acknowledged by B',
      () => Promise.resolve(ackedCount(log) > before + 300 || undefined),
      30_000,
      20,
    );
    closeSync(openSync(stop, 'w'));
    const summary = await followWriterSummary(writer);
    // Writes that reached A while it stepped down were refused with ESHUTDOWN and sent again;
    // then A cut its clients, and the writer found B.
    expect(summary).toMatchObject({ failed: 0, errors: [] });
    expect(summary.reconnects).toBeGreaterThanOrEqual(1);
    expect(await verifyAckedWrites(b.uri('v'), log)).toBeGreaterThan(0);
    // A new client of A finds a read-only export: its writes are refused for good (EPERM).
    await expect(
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', a.uri('v')]),
    ).rejects.toThrow(/Operation not permitted|read-only|Permission/i);
  });

  it('keeps writing when the replica is SIGKILLed, then resyncs only the dirty regions', async () => {
    const [a, b, uri] = await pair('256MiB');
    const log = path.join(a.dataDir, 'acked.log');
    // 4000 writes within the first 16 MiB: little dirtied, so a full copy would stand out.
    const writer = startAckWriter(uri, log, 4000, 16, 4096);
    await ackedLines(log, 300);
    await b.kill('SIGKILL');
    expect(await writer).toMatch(/acked=4000 flushed/); // sync mode: the primary carried on alone
    const behind = await waitPeer(
      a,
      'v',
      b,
      (p) => p.state === 'OutOfSync' && p.dirtyBytes > 0,
      'out of sync',
    );
    expect(behind.reason).not.toBe('');
    const before = behind.resyncBytesSent;
    await b.start();
    const caught = await waitPeer(a, 'v', b, inSync, 'in sync again');
    const sent = caught.resyncBytesSent - before;
    expect(sent).toBeGreaterThan(0);
    expect(sent).toBeLessThanOrEqual(behind.dirtyBytes * 1.1);
    expect(sent).toBeLessThanOrEqual(16 * MiB); // far below the 256 MiB volume
    await expectIdentical(a, b, 'v');
    expect(await verifyAckedWrites(b.uri('v'), log)).toBe(4000);
  });

  it('has every acknowledged write on the replica after the primary is SIGKILLed; the old primary rejoins resyncing only its activity log', async () => {
    const [a, b, uri] = await pair('1GiB');
    const log = path.join(a.dataDir, 'acked.log');
    // Writes confined to the first 32 MiB: the activity log then spans a few extents only.
    const writer = startAckWriter(uri, log, 100_000, 16, 8192);
    await ackedLines(log, 1000);
    await a.kill('SIGKILL');
    expect(await writer).toMatch(/connection lost/);

    await b.ctl('promote', 'v', '--force');
    expect((await volumeStatus(b, 'v')).role).toBe('primary');
    expect(await verifyAckedWrites(b.uri('v'), log)).toBeGreaterThan(1000);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 900m 1m', b.uri('v')]);

    // It still believes it is primary, in the epoch before B's forced promotion: the first
    // contact with B, either way, tells it that it was replaced, and it steps down by itself.
    await a.start();
    await waitFor(
      'the old primary to step down',
      async () => ((await volumeStatus(a, 'v')).role === 'secondary' ? true : undefined),
      20_000,
    );
    const caught = await waitPeer(b, 'v', a, inSync, 'in sync as the new secondary');
    expect(caught.resyncBytesSent).toBeGreaterThan(0);
    expect(caught.resyncBytesSent).toBeLessThan(128 * MiB); // its log's extents plus the new 1 MiB, not 1 GiB
    await expectIdentical(a, b, 'v');
    expect(await verifyAckedWrites(a.uri('v'), log)).toBeGreaterThan(1000);
  });

  it('fails writes with EIO in strict-sync mode while the replica is down, without acknowledging on one copy', async () => {
    const [a, b, uri] = await pair('64MiB', 'strict-sync');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', uri]);
    await b.kill('SIGKILL');
    await waitPeer(a, 'v', b, (p) => p.state !== 'InSync', 'noticed gone');
    await expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 64k', uri])).rejects.toThrow(
      /Input\/output error/,
    );
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x11 0 64k', uri]);
    expect(out).not.toContain('verification failed');
    await b.start();
    await waitPeer(a, 'v', b, inSync, 'back in sync');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 64k', uri]);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await expectIdentical(a, b, 'v');
  });

  it('survives a cut, a half-open peer and a slow link without hanging writes beyond the peer timeout', async () => {
    const a = await start('node-a');
    const link = await ProxiedReplica.start('node-b');
    agents.push(link.agent);
    const b = link.agent;
    try {
      const uri = await a.createVolume('v', '64MiB');
      await a.ctl('replicate', 'v', '--to', link.address);
      const viaProxy = link.asPeer;
      await waitPeer(a, 'v', viaProxy, inSync, 'in sync');
      // The data lanes really go through the proxy (the baseline's zero runs, at least).
      expect(link.dataBytesForwarded).toBeGreaterThan(0);

      // Half-open: bytes vanish, nothing closes. The write completes once the ack deadline
      // (1.5 s) fails the link; it is then recorded for resync.
      link.setMode('blackhole');
      const t0 = Date.now();
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1m 1m', uri]);
      expect(Date.now() - t0).toBeLessThan(8_000);
      await waitPeer(
        a,
        'v',
        viaProxy,
        (p) => p.state === 'OutOfSync' && p.dirtyBytes >= MiB,
        'out of sync',
      );
      link.setMode('pass');
      await waitPeer(a, 'v', viaProxy, inSync, 'healed');

      // A dropped connection mid-workload.
      const fio = fioVerify(uri, '32M');
      await new Promise((r) => setTimeout(r, 500));
      link.dropAll();
      await fio;
      await waitPeer(a, 'v', viaProxy, inSync, 'in sync after the drop');

      // A slow link: writes wait for it, nothing fails.
      link.setDelay(30);
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 8m 2m', uri]);
      const p = await peerOf(a, 'v', viaProxy);
      expect(p.state).toBe('InSync');
      link.setDelay(0);
      await expectIdentical(a, b, 'v');
    } finally {
      await link.close();
    }
  });

  it('acknowledges async writes locally over a slow link, ships them in order, and ends identical', async () => {
    const a = await start('node-a');
    const link = await ProxiedReplica.start('node-b');
    agents.push(link.agent);
    try {
      const uri = await a.createVolume('v', '64MiB');
      await a.ctl('replicate', 'v', '--to', link.address, '--mode', 'async');
      await waitPeer(a, 'v', link.asPeer, inSync, 'in sync');
      link.setDelay(200);
      // 20 dependent 4k writes, each acknowledged before the next is issued: in sync mode each
      // would wait a 400 ms round trip; async acknowledges them on the local copy.
      const cmds = Array.from({ length: 20 }, (_, i) => ['-c', `write -P ${i + 1} ${i}m 4k`]);
      const t0 = Date.now();
      await run('qemu-io', ['-f', 'raw', ...cmds.flat(), uri]);
      expect(Date.now() - t0).toBeLessThan(3_000);
      // 20 overwrites of one block: acknowledged locally too, and pipelined to the replica on
      // its ordered lane (qemu-io's closing flush waits for them all: one round trip, not one
      // per overwrite, ~8 s), which applies them in order, so the last one wins there too.
      const same = Array.from({ length: 20 }, (_, i) => ['-c', `write -P ${0xd0 + i} 0 4k`]);
      const t1 = Date.now();
      const out = await run('qemu-io', ['-f', 'raw', ...same.flat(), uri]);
      expect(Date.now() - t1).toBeLessThan(4_000);
      const latenciesMs = [...out.matchAll(/and ([\d.]+) ops\/sec/g)].map((m) => 1000 / +m[1]);
      expect(latenciesMs).toHaveLength(20);
      expect(Math.max(...latenciesMs)).toBeLessThan(200); // a round trip to the replica is 400
      // A flush answers only once the replica has (and flushed) everything before it.
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 8k 4k', '-c', 'flush', uri]);
      expect(await peerOf(a, 'v', link.asPeer)).toMatchObject({ state: 'InSync', dirtyBytes: 0 });
      link.setDelay(0);
      await waitPeer(a, 'v', link.asPeer, inSync, 'caught up');
      await expectIdentical(a, link.agent, 'v');
    } finally {
      await link.close();
    }
  });

  it('baselines from the allocation map after a clean stop, and reads everything after a crash or an outside change', async () => {
    const a = await start('node-a');
    const uri = await a.createVolume('v', '64MiB');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x31 1m 3m',
      '-c',
      'write -P 0x32 40m 64k',
      uri,
    ]);
    const mapFile = path.join(a.dataDir, 'volumes', 'v', 'allocation.map');
    await a.stop();
    expect(existsSync(mapFile)).toBe(true);
    // Changed while the agent is down: the saved map no longer describes the file.
    const fd = openSync(dataFile(a, 'v'), 'r+');
    writeSync(fd, Buffer.alloc(64 * 1024, 0x33), 0, 64 * 1024, 20 * MiB);
    closeSync(fd);
    await a.start();
    expect(existsSync(mapFile)).toBe(false); // consumed at start
    const b = await start('node-b');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'baselined');
    await expectIdentical(a, b, 'v');

    // A clean stop and start: the map is trusted; a crash: there is none.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x34 50m 1m', uri]);
    await a.stop();
    await a.start();
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x35 60m 64k', uri]);
    await a.kill('SIGKILL');
    expect(existsSync(mapFile)).toBe(false);
    await a.start();
    const c = await start('node-c');
    await a.ctl('replicate', 'v', '--to', c.grpcAddress);
    await waitPeer(a, 'v', c, inSync, 'baselined after the crash');
    await waitPeer(a, 'v', b, inSync, 'in sync after the crash');
    await expectIdentical(a, c, 'v');
    await expectIdentical(a, b, 'v');
  });

  it('writes a baseline around the replica’s page cache, and ends identical and on disk', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '128MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 96m', uri]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    const done = await waitPeer(a, 'v', b, inSync, 'baselined');
    expect(done.resyncBytesSent).toBe(96 * MiB);
    // Catch-up data is rarely read on a secondary: it went to the disk, not into memory
    // (a chunk received while every aligned buffer was busy may go through the cache).
    const cached = Number(await run('fincore', ['-b', '-n', '-o', 'RES', dataFile(b, 'v')]));
    expect(cached).toBeLessThan(16 * MiB);
    await expectIdentical(a, b, 'v');
  });

  it('baselines a 1 GiB volume while the workload keeps writing, and ends identical', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const uri = await a.createVolume('v', '1GiB');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x5a 0 256m',
      '-c',
      'write -P 0xa5 700m 100m',
      uri,
    ]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    const workload = fioVerify(uri, '512M');
    await waitPeer(
      a,
      'v',
      b,
      (p) => p.state === 'Baselining' || p.state === 'InSync',
      'baselining',
    );
    await workload;
    const done = await waitPeer(a, 'v', b, inSync, 'in sync', 120_000);
    expect(done.resyncBytesSent).toBeGreaterThanOrEqual(300 * MiB); // the data, not the holes
    expect(done.resyncBytesSent).toBeLessThan(700 * MiB);
    await expectIdentical(a, b, 'v');
  });

  it('fans out to two replicas; losing one keeps the other in sync', async () => {
    const a = await start('node-a');
    const b = await start('node-b');
    const c = await start('node-c');
    const uri = await a.createVolume('v', '64MiB');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--to', c.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await waitPeer(a, 'v', c, inSync, 'in sync');
    await fioVerify(uri, '64M');
    await expectIdentical(a, b, 'v');
    await expectIdentical(a, c, 'v');
    await c.kill('SIGKILL');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 0 4m', uri]);
    await waitPeer(a, 'v', c, (p) => p.state === 'OutOfSync', 'out of sync');
    expect(await peerOf(a, 'v', b)).toMatchObject({ state: 'InSync', dirtyBytes: 0 });
    await expectIdentical(a, b, 'v');
  });

  it('reports split brain when both copies wrote independently, and resolves it only when told which copy survives', async () => {
    const [a, b, uri] = await pair();
    await b.kill('SIGKILL');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x01 0 1m', uri]); // only on a
    await waitPeer(a, 'v', b, (p) => p.state === 'OutOfSync', 'out of sync');
    await a.kill('SIGKILL');
    await b.start();
    await b.ctl('promote', 'v', '--force');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x02 0 1m', b.uri('v')]); // only on b
    await a.start();
    await a.ctl('demote', 'v');
    const p = await waitPeer(b, 'v', a, (x) => x.state === 'SplitBrain', 'split brain');
    expect(p.reason).toMatch(/split brain/);
    // Nothing was overwritten on either side.
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x01 0 1m', a.uri('v')]);
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x02 0 1m', b.uri('v')]);
    // Until the operator picks the survivor: b wins, a's diverging writes are discarded.
    await b.ctl('resolve', 'v', '--discard-peer', a.grpcAddress);
    await waitPeer(b, 'v', a, inSync, 'resynced from the survivor');
    await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x02 0 1m', a.uri('v')]);
    await expectIdentical(a, b, 'v');
  });
});
