// `lockstep ctl` against a real agent: tables for people, stable JSON for scripts, clear
// errors with stable codes, and deletes that respect attached clients.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { ADMIN, AgentProcess, lockstepBin, run } from '../harness/agent-process';
import { expectIdentical } from '../harness/replication';
import { tlsDirFor } from '../harness/test-certificates';
import { RawNbd } from '../harness/raw-nbd';
import { productNode } from '../harness/product-runtime';

const execFileAsync = promisify(execFile);

describe('lockstep ctl', () => {
  const agent = new AgentProcess({ node: 'node-ctl', metrics: true });
  beforeAll(() => agent.start());
  afterAll(() => agent.dispose());

  it('creates and lists volumes as a table and as JSON', async () => {
    expect(await agent.ctl('volume', 'create', 'alpha', '--size', '256MiB')).toMatch(
      /^volume alpha created \(256MiB\): nbd\+unix:\/\/\/alpha\?socket=/,
    );
    await agent.ctl('volume', 'create', 'beta', '--size', '1GiB', '--read-only');
    const table = await agent.ctl('volume', 'list');
    expect(table.split('\n')[0]).toMatch(
      /^NAME\s+STATE\s+SIZE\s+ALLOCATED\s+MODE\s+CLIENTS\s+EXPORT \/ ERROR$/,
    );
    expect(table).toMatch(/alpha\s+Ready\s+256MiB\s+0B\s+rw\s+0\s+nbd\+unix/);
    expect(table).toMatch(/beta\s+Ready\s+1GiB\s+0B\s+ro/);
    const json = JSON.parse(await agent.ctl('volume', 'list', '-o', 'json')) as {
      volumes: Record<string, unknown>[];
    };
    expect(json.volumes.map((v) => Object.keys(v).sort())[0]).toEqual(
      [
        'allocatedBytes',
        'clients',
        'cloneOf',
        'dataPath',
        'error',
        'exportUri',
        'hydratedPercent',
        'name',
        'readOnly',
        'replication',
        'role',
        'sizeBytes',
        'state',
        'uuid',
      ].sort(),
    );
    expect(json.volumes.find((v) => v.name === 'alpha')).toMatchObject({
      role: 'primary',
      replication: null,
      sizeBytes: 256 * 2 ** 20,
      readOnly: false,
      state: 'Ready',
    });
  });

  it('shows status with the node, version and volumes', async () => {
    const status = JSON.parse(await agent.ctl('status', '-o', 'json')) as {
      info: { node: string; version: string; serving: boolean };
      nbdSocket: string;
      volumes: { name: string }[];
    };
    expect(status.info.node).toBe('node-ctl');
    expect(status.info.version).toMatch(/^\d+\.\d+\.\d+/);
    expect(status.info.serving).toBe(true);
    expect(status.nbdSocket).toBe(agent.nbdSocket);
    expect(status.volumes.map((v) => v.name)).toEqual(expect.arrayContaining(['alpha', 'beta']));
    expect(await agent.ctl('status')).toMatch(/node:\s+node-ctl/);
  });

  it.each([
    [
      ['volume', 'create', 'x', '--size', 'lots'],
      /invalid --size "lots".*LOCKSTEP_ERR_INVALID_ARGUMENT/,
    ],
    [
      ['volume', 'create', 'x', '--size', '1000'],
      /multiple of 4096 bytes.*LOCKSTEP_ERR_INVALID_ARGUMENT/,
    ],
    [
      ['volume', 'create', 'Bad/Name', '--size', '1MiB'],
      /invalid volume name.*LOCKSTEP_ERR_INVALID_ARGUMENT/,
    ],
    [['volume', 'create', 'alpha', '--size', '1MiB'], /already exists.*LOCKSTEP_ERR_VOLUME_EXISTS/],
    [['volume', 'delete', 'nope'], /"nope" does not exist.*LOCKSTEP_ERR_VOLUME_NOT_FOUND/],
  ])('rejects %j with a clear error', async (args, message) => {
    await expect(agent.ctl(...args)).rejects.toThrow(message);
  });

  it('says which agent it cannot reach', async () => {
    const err = (await run(productNode(), [
      path.join(__dirname, '../../bin/lockstep.js'),
      'ctl',
      '--agent',
      '127.0.0.1:1',
      '--insecure',
      '--timeout',
      '2',
      'status',
    ]).catch((e: Error) => e)) as Error;
    expect(err.message).toMatch(
      /cannot reach the agent at 127\.0\.0\.1:1.*LOCKSTEP_ERR_UNAVAILABLE/s,
    );
  });

  it('refuses to delete a volume with an attached client unless forced', async () => {
    await agent.ctl('volume', 'create', 'busy', '--size', '4MiB');
    const client = await RawNbd.open(agent.nbdSocket, 'busy');
    await expect(agent.ctl('volume', 'delete', 'busy')).rejects.toThrow(
      /1 NBD client\(s\) attached.*LOCKSTEP_ERR_VOLUME_IN_USE/,
    );
    expect(await agent.ctl('volume', 'list')).toMatch(/busy\s+Ready\s+4MiB\s+\S+\s+rw\s+1/);
    expect(await agent.ctl('volume', 'delete', 'busy', '--force')).toBe('volume busy deleted\n');
    expect(await client.closedByServer()).toBe(true);
    expect(existsSync(path.join(agent.dataDir, 'volumes', 'busy'))).toBe(false);
    expect(await agent.ctl('volume', 'list')).not.toContain('busy');
  });

  it('exposes Prometheus metrics for NBD traffic', async () => {
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 1 0 64k',
      '-c',
      'read 0 64k',
      agent.uri('alpha'),
    ]);
    const res = await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`);
    const text = await res.text();
    expect(text).toMatch(
      /lockstep_nbd_requests_total\{volume="alpha",op="write",result="ok",node="node-ctl"\} [1-9]/,
    );
    expect(text).toMatch(
      /lockstep_nbd_bytes_total\{volume="alpha",op="read",node="node-ctl"\} 65536/,
    );
    expect(text).toMatch(/lockstep_volume_size_bytes\{volume="beta",node="node-ctl"\} 1073741824/);
    expect(text).toContain('lockstep_nbd_request_duration_seconds_bucket');
  });
});

describe('lockstep ctl replicate --wait', () => {
  const a = new AgentProcess({ node: 'wait-a' });
  const b = new AgentProcess({ node: 'wait-b' });
  beforeAll(async () => {
    await a.start();
    await b.start();
  });
  afterAll(async () => {
    await a.dispose();
    await b.dispose();
  });

  it('returns once every peer is in sync, printing the progress as lines when not on a terminal', async () => {
    const uri = await a.createVolume('w', '64MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 48m', uri]);
    // Throttled, so that the baseline takes a few seconds and shows its progress.
    const { stdout, stderr } = await execFileAsync(productNode(), [
      lockstepBin,
      'ctl',
      '--agent',
      a.grpcAddress,
      '--tls-dir',
      await tlsDirFor(ADMIN),
      'replicate',
      'w',
      '--to',
      b.grpcAddress,
      '--max-resync-rate',
      '16MiB',
      '--wait',
      '2m',
    ]);
    expect(stdout).toMatch(
      new RegExp(`${b.grpcAddress.replace(/\./g, '\\.')}\\s+wait-b\\s+InSync\\s+0B`),
    );
    const lines = stderr.trim().split('\n');
    expect(lines.length).toBeGreaterThanOrEqual(2);
    expect(lines.every((l) => /^w: \w+( \d+% \(.+ of .+, ETA .+\))?$/.test(l))).toBe(true);
    expect(stderr).toMatch(/^w: (Baselining|Resyncing) \d+% \(/m);
    await expectIdentical(a, b, 'w');
  });
});
