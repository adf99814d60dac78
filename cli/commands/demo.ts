// `lockstep demo`: the whole loop on one machine, no Kubernetes. Two agents and a mediator on
// loopback, a replicated volume, a writer that records every write the primary acknowledged, a
// SIGKILL of the primary mid-stream, the replica taking over by itself through the mediator, a
// check that every acknowledged write is there, and the old primary coming back as a replica
// that resyncs only what changed. Exits 0 only if no acknowledged write is missing.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { AgentClient } from '../../lib/agent-client';
import { errorMessage } from '../../lib/errors';
import { MediatorClient } from '../../lib/mediator-client';
import { NbdClient } from '../../lib/nbd-client';
import { packageRoot } from '../../lib/package-root';
import { createAuthority, issueCertificate } from '../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../lib/tls/tls-dir';
import type { Identity } from '../../lib/tls/identity';
import { openTransport, type Transport } from '../../lib/tls/transport';
import pino from 'pino';
import { formatSize, parseSize } from '../../lib/size';

const SLOT = 4096;
const MAGIC = 0x4c4f434b53544550n; // "LOCKSTEP"

function pattern(slot: number): Buffer {
  const b = Buffer.allocUnsafe(SLOT);
  for (let at = 0; at < SLOT; at += 16) {
    b.writeBigUInt64BE(BigInt(slot), at);
    b.writeBigUInt64BE(MAGIC, at + 8);
  }
  return b;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.once('error', reject);
  });
}

const say = (msg: string) => process.stdout.write(`${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface DemoAgent {
  node: string;
  dir: string;
  address: string;
  child: ChildProcess;
  client: AgentClient;
}

/** A CA, and a TLS directory for each component: the demo runs with mutual TLS, as a user would. */
async function makeCertificates(
  root: string,
): Promise<{ dir(name: string): string; admin: Transport }> {
  const ca = await createAuthority('Lockstep demo CA');
  const dir = (name: string) => path.join(root, 'tls', name);
  const ids: Identity[] = [
    { role: 'agent', name: 'node-a' },
    { role: 'agent', name: 'node-b' },
    { role: 'mediator', name: 'mediator' },
    { role: 'admin', name: 'admin' },
  ];
  for (const id of ids)
    await writeTlsDir(
      dir(id.name),
      ca.certPem,
      await issueCertificate(ca, id, { validMs: 86_400_000 }),
    );
  return { dir, admin: await openTransport({ tlsDir: dir('admin') }, pino({ level: 'silent' })) };
}

async function startMediator(
  root: string,
  tls: Awaited<ReturnType<typeof makeCertificates>>,
): Promise<{ address: string; child: ChildProcess }> {
  const address = `127.0.0.1:${await freePort()}`;
  const child = spawn(
    process.execPath,
    [
      path.join(packageRoot, 'bin', 'lockstep.js'),
      'mediator',
      '--data-dir',
      path.join(root, 'mediator'),
      '--listen',
      address,
      '--tls-dir',
      tls.dir('mediator'),
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const client = new MediatorClient(address, tls.admin, 1000);
  try {
    for (let i = 0; ; i++) {
      try {
        await client.records();
        return { address, child };
      } catch (err) {
        if (i > 100 || child.exitCode !== null)
          throw new Error(`the mediator did not start: ${errorMessage(err)}`);
        await sleep(100);
      }
    }
  } finally {
    client.close();
  }
}

async function startAgent(
  node: string,
  root: string,
  tls: Awaited<ReturnType<typeof makeCertificates>>,
  port?: number,
): Promise<DemoAgent> {
  const dir = path.join(root, node);
  const address = `127.0.0.1:${port ?? (await freePort())}`;
  const child = spawn(
    process.execPath,
    [
      path.join(packageRoot, 'bin', 'lockstep.js'),
      'agent',
      '--node',
      node,
      '--data-dir',
      dir,
      '--listen',
      address,
      '--peer-timeout',
      '2000',
      '--tls-dir',
      tls.dir(node),
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const client = new AgentClient(address, tls.admin, 2000);
  for (let i = 0; ; i++) {
    try {
      // Its API answers while volumes resume; their exports are open only once serving.
      if ((await client.info()).serving) return { node, dir, address, child, client };
      throw new Error('still starting');
    } catch (err) {
      if (i > 100 || child.exitCode !== null)
        throw new Error(`agent ${node} did not start: ${errorMessage(err)}`);
      await sleep(100);
    }
  }
}

/** Waits until the primary's replica is in sync, for the mediator too; its resync bytes. */
async function waitInSync(primary: DemoAgent, volume: string): Promise<number> {
  for (let i = 0; ; i++) {
    const v = await primary.client.getVolume(volume);
    const p = v.replication?.peers[0];
    const counted = (v.replication?.protection?.inSync.length ?? 0) > 0;
    if (p?.state === 'InSync' && counted) return Number(p.resyncBytesSent);
    if (i > 600) throw new Error(`replica not in sync after 60 s (state ${p?.state ?? 'none'})`);
    await sleep(100);
  }
}

const GRACE_MS = 3_000;

/** Waits until the copy accepts writes as primary; its epoch. */
async function waitTakeOver(agent: DemoAgent, volume: string): Promise<number> {
  for (let i = 0; ; i++) {
    const v = await agent.client.getVolume(volume);
    const p = v.replication?.protection;
    if (v.role === 'primary' && p?.acceptsWrites) return Number(p.epoch);
    if (i > 300)
      throw new Error(
        `node-b did not take over within 30 s (${p?.state ?? '?'}: ${p?.detail ?? ''})`,
      );
    await sleep(100);
  }
}

export function demoCommand(): Command {
  return new Command('demo')
    .option('--size <size>', 'volume size', '256MiB')
    .option('--seconds <n>', 'how long to write before killing the primary', '3')
    .option('--keep', 'keep the agents’ data directories (printed) for inspection', false)
    .action(async (opts: { size: string; seconds: string; keep: boolean }) => {
      const size = parseSize(opts.size, '--size');
      const root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-demo-'));
      const agents: DemoAgent[] = [];
      const children: ChildProcess[] = [];
      try {
        say(
          `1. starting two agents and a mediator on loopback, with mutual TLS from a CA made for the demo (data under ${root})`,
        );
        const tls = await makeCertificates(root);
        const mediator = await startMediator(root, tls);
        children.push(mediator.child);
        const a = await startAgent('node-a', root, tls);
        agents.push(a);
        const b = await startAgent('node-b', root, tls);
        agents.push(b);
        say(`   node-a at ${a.address}, node-b at ${b.address}, mediator at ${mediator.address}`);

        say(
          `2. creating volume "demo" (${formatSize(size)}) on node-a, replicating synchronously to node-b, ` +
            `automatic failover through the mediator after ${GRACE_MS / 1000} s without a primary`,
        );
        await a.client.createVolume('demo', size);
        await a.client.replicate({
          name: 'demo',
          targets: [b.address],
          mode: 'sync',
          regionSize: 65536,
          maxResyncBytesPerSecond: 0,
          mediator: { address: mediator.address, failover: 'automatic', graceMs: GRACE_MS },
        });
        await waitInSync(a, 'demo');
        const before = (await a.client.getVolume('demo')).replication?.protection;
        say(`   replica in sync; node-a is primary in epoch ${before?.epoch ?? 0}`);

        say(
          `3. writing unique 4 KiB blocks through NBD on node-a for ${opts.seconds} s, 16 in flight, recording each acknowledgement`,
        );
        const writer = await NbdClient.connect(
          { socketPath: path.join(a.dir, 'nbd.sock') },
          'demo',
        );
        const slots = Math.floor(size / SLOT);
        const acked: number[] = [];
        let failed = 0;
        let next = 0;
        const order = Array.from({ length: slots }, (_, i) => i).sort(() => Math.random() - 0.5);
        const stopAt = Date.now() + Number(opts.seconds) * 1000;
        let killed = false;
        const lanes = Array.from({ length: 16 }, async () => {
          while (next < slots) {
            const slot = order[next++];
            try {
              await writer.write(slot * SLOT, pattern(slot));
              acked.push(slot);
            } catch {
              failed++;
              return;
            }
            // Kill on time, or before the volume runs out of fresh blocks to write.
            if (!killed && (Date.now() >= stopAt || next >= slots * 0.8)) {
              killed = true;
              say(`4. SIGKILL node-a with writes in flight (${acked.length} acknowledged so far)`);
              a.child.kill('SIGKILL');
            }
          }
        });
        await Promise.all(lanes);
        say(
          `   writer stopped: ${acked.length} writes acknowledged, ${failed} in flight when node-a died (never acknowledged)`,
        );

        const t0 = Date.now();
        say('5. node-b takes over by itself: the mediator grants it the next epoch (no command)');
        const epoch = await waitTakeOver(b, 'demo');
        say(`   node-b is primary in epoch ${epoch}, ${Date.now() - t0} ms after the kill`);

        say('6. reading every acknowledged block back from node-b');
        const reader = await NbdClient.connect(
          { socketPath: path.join(b.dir, 'nbd.sock') },
          'demo',
        );
        let missing = 0;
        for (const slot of acked) {
          if (!(await reader.read(slot * SLOT, SLOT)).equals(pattern(slot))) missing++;
        }
        await reader.close();
        await writer.close().catch(() => undefined);

        say('7. restarting node-a: it sees the newer epoch, steps down and resyncs what changed');
        agents.splice(agents.indexOf(a), 1);
        a.client.close();
        const back = await startAgent('node-a', root, tls, Number(a.address.split(':')[1]));
        agents.push(back);
        const resynced = await waitInSync(b, 'demo');
        const role = (await back.client.getVolume('demo')).role;
        say(
          `   node-a is a ${role} of node-b again, ${formatSize(resynced)} resynced ` +
            '(the regions node-a was writing when it died, and what node-b wrote since)',
        );
        say('');
        say(
          `summary: ${acked.length} acknowledged writes, ${acked.length - missing} found on the replica, ${missing} missing`,
        );
        say(
          missing === 0
            ? 'RPO = 0: no acknowledged write was lost.'
            : 'FAILED: acknowledged writes were lost.',
        );
        process.exitCode = missing === 0 && acked.length > 0 ? 0 : 1;
      } finally {
        for (const ag of agents) {
          ag.client.close();
          ag.child.kill('SIGKILL');
        }
        for (const c of children) c.kill('SIGKILL');
        if (opts.keep) say(`data kept in ${root}`);
        else rmSync(root, { recursive: true, force: true });
      }
    });
}
