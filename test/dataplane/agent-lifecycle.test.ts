// The agent as a process: killed, stopped, restarted, fed broken files. Acknowledged data
// survives, broken volumes are reported by file name, and nothing is silently emptied.
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { AgentProcess, run, startAckWriter, verifyAckedWrites } from '../harness/agent-process';
import { waitFor } from '../harness/processes';
import { RawNbd } from '../harness/raw-nbd';

interface VolumeJson {
  name: string;
  uuid: string;
  sizeBytes: number;
  state: string;
  error: string;
}

async function volumes(agent: AgentProcess): Promise<Record<string, VolumeJson>> {
  const list = JSON.parse(await agent.ctl('volume', 'list', '-o', 'json')) as {
    volumes: VolumeJson[];
  };
  return Object.fromEntries(list.volumes.map((v) => [v.name, v]));
}

const ACKED_BEFORE_KILL = 500;

/** Complete lines only: the writer may be mid-line when the test reads the log. */
function ackedLines(log: string): number {
  return existsSync(log) ? readFileSync(log, 'utf8').split('\n').length - 1 : 0;
}

async function writesUnderWay(log: string): Promise<void> {
  await waitFor(
    'acknowledged writes',
    () => Promise.resolve(ackedLines(log) >= ACKED_BEFORE_KILL || undefined),
    30_000,
    20,
  );
}

describe('agent lifecycle', () => {
  let agent: AgentProcess;
  beforeEach(async () => {
    agent = await new AgentProcess().start();
  });
  afterEach(() => agent.dispose());

  it('keeps every acknowledged write when SIGKILLed mid-workload, and finds its volumes on restart', async () => {
    const uri = await agent.createVolume('data', '128MiB');
    const before = await volumes(agent);
    const log = path.join(agent.dataDir, 'acked.log');
    const writer = startAckWriter(uri, log, 30_000);
    await writesUnderWay(log);
    expect(await agent.kill('SIGKILL')).toBe('SIGKILL');
    expect(await writer).toMatch(/connection lost/);
    await agent.start();
    const { uuid, sizeBytes, state } = before.data;
    expect((await volumes(agent)).data).toMatchObject({ uuid, sizeBytes, state });
    expect(await verifyAckedWrites(uri, log)).toBeGreaterThanOrEqual(ACKED_BEFORE_KILL);
  });

  it('has flushed data after SIGKILL and restart', async () => {
    const uri = await agent.createVolume('flushed', '16MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1m 3m', '-c', 'flush', uri]);
    await agent.kill('SIGKILL');
    await agent.start();
    const out = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0x42 1m 3m',
      '-c',
      'read -P 0 0 1m',
      uri,
    ]);
    expect(out).not.toContain('verification failed');
  });

  it('on SIGTERM answers requests in flight, flushes and exits 0', async () => {
    const uri = await agent.createVolume('drain', '128MiB');
    const log = path.join(agent.dataDir, 'acked.log');
    const writer = startAckWriter(uri, log, 30_000, 32);
    await writesUnderWay(log);
    expect(await agent.kill('SIGTERM')).toBe(0);
    await writer;
    expect(agent.proc.log()).toContain('all volumes flushed');
    await agent.start();
    expect(await verifyAckedWrites(uri, log)).toBeGreaterThanOrEqual(ACKED_BEFORE_KILL);
  });

  it('on SIGTERM exits while a client holds a connection to its API open', async () => {
    await agent.createVolume('held', '4MiB');
    // A TCP connection that never starts its TLS handshake: what a client that reconnects after
    // the shutdown's GOAWAY leaves behind. It used to hold the shutdown open for the TLS
    // handshake timeout (120 s), and the process open after that.
    const api = new URL(`tcp://${agent.grpcAddress}`);
    const held = net.connect(Number(api.port), api.hostname);
    await once(held, 'connect');
    try {
      let timer: NodeJS.Timeout | undefined;
      const exited = await Promise.race([
        agent.kill('SIGTERM'),
        new Promise((resolve) => {
          timer = setTimeout(() => resolve('still running after 60 s'), 60_000);
        }),
      ]);
      clearTimeout(timer);
      expect(exited).toBe(0);
      expect(agent.proc.log()).toContain('all volumes flushed');
    } finally {
      held.destroy();
    }
  });

  it('is reached again within seconds of its restart by a client that kept its channel while it was down', async () => {
    // The operator keeps one channel per agent. grpc-js's default reconnect backoff grows to
    // 120 s and fails calls at once meanwhile: after 48 s down, the next attempt came ~20 s
    // after the agent served again, and a split brain went unseen for as long.
    const client = agent.client(2_000);
    try {
      await client.listVolumes();
      await agent.kill('SIGKILL');
      const downUntil = Date.now() + 48_000;
      while (Date.now() < downUntil) {
        await expect(client.listVolumes()).rejects.toThrow();
        await new Promise((r) => setTimeout(r, 1_000));
      }
      await agent.start();
      const served = Date.now();
      await waitFor('the kept channel to reach the agent', () => client.listVolumes(), 5_000, 100);
      expect(Date.now() - served).toBeLessThan(5_000);
    } finally {
      client.close();
    }
  }, 120_000);

  it('reports corrupt, truncated or mismatched volume files by name and keeps serving the others', async () => {
    await agent.createVolume('good', '4MiB');
    await agent.createVolume('torn', '4MiB');
    await agent.createVolume('tampered', '4MiB');
    await agent.createVolume('shrunk', '4MiB');
    await agent.stop();
    const vdir = (name: string) => path.join(agent.dataDir, 'volumes', name);
    const tornMeta = path.join(vdir('torn'), 'meta.json');
    writeFileSync(tornMeta, readFileSync(tornMeta, 'utf8').slice(0, 40));
    const tamperedMeta = path.join(vdir('tampered'), 'meta.json');
    writeFileSync(
      tamperedMeta,
      readFileSync(tamperedMeta, 'utf8').replace('"sizeBytes": 4194304', '"sizeBytes": 8388608'),
    );
    truncateSync(path.join(vdir('shrunk'), 'data.img'), 4096);
    await agent.start();

    const v = await volumes(agent);
    expect(v.good.state).toBe('Ready');
    expect(v.torn).toMatchObject({
      state: 'Failed',
      error: expect.stringContaining(tornMeta) as string,
    });
    expect(v.torn.error).toContain('not valid JSON');
    expect(v.tampered).toMatchObject({
      state: 'Failed',
      error: expect.stringContaining('checksum mismatch') as string,
    });
    expect(v.shrunk).toMatchObject({
      state: 'Failed',
      error: expect.stringContaining(path.join(vdir('shrunk'), 'data.img')) as string,
    });

    // A failed volume is never served, not even as an empty one; the good one still is.
    const c = await RawNbd.connect(agent.nbdSocket);
    await c.greet();
    const refused = await c.go('torn');
    expect(refused.type).not.toBe(1);
    expect(refused.message).toContain('meta.json');
    c.destroy();
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 7 0 4k',
      '-c',
      'read -P 7 0 4k',
      agent.uri('good'),
    ]);
    const status = await agent.ctl('status');
    expect(status).toMatch(/torn\s+Failed/);
  });

  it('refuses a second agent on the same data directory', async () => {
    const second = new AgentProcess({ dataDir: agent.dataDir, node: 'node-b' });
    await expect(second.start()).rejects.toThrow(/LOCKSTEP_ERR_DATA_DIR_LOCKED/);
    expect(agent.proc.child.exitCode).toBeNull();
  });

  it('takes over a data directory whose agent was SIGKILLed', async () => {
    await agent.createVolume('survivor', '4MiB');
    await agent.kill('SIGKILL');
    expect(existsSync(path.join(agent.dataDir, 'agent.pid'))).toBe(true);
    rmSync(agent.nbdSocket, { force: true });
    await agent.start();
    expect((await volumes(agent)).survivor.state).toBe('Ready');
  });
});
