// `kubectl lockstep`, run by the real kubectl (it finds kubectl-lockstep on PATH) against a
// control plane of this file's own, whose objects' status the test writes as the operator
// would (the operator's own status is tested in operator.test.ts). The progress bar is drawn in
// a real terminal (tmux) and read back with capture-pane; scripts get -o json.
import { execFile, execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../../lib/package-root';
import {
  apply,
  installLockstep,
  oneVolumeGroup,
  removeDir,
  syncRelationship,
} from '../harness/cluster';
import { kubectl, startControlPlane, type ControlPlane } from '../harness/control-plane';
import { waitFor } from '../harness/processes';
import { productNode } from '../harness/product-runtime';
import { testTool } from '../harness/test-tools';

const execFileAsync = promisify(execFile);
const NS = 'shop';
const GiB = 1 << 30;

describe('kubectl lockstep', () => {
  let cp: ControlPlane;
  let root: string;
  let env: NodeJS.ProcessEnv;
  const k = (...args: string[]) => kubectl(cp.kubeconfig, args);

  /** `kubectl lockstep ARGS` as a user runs it; resolves with its exit code and output. */
  async function plugin(
    ...args: string[]
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      const { stdout, stderr } = await execFileAsync(testTool('kubectl'), ['lockstep', ...args], {
        env,
      });
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
    }
  }
  const json = async <T>(...args: string[]): Promise<T> => {
    const r = await plugin(...args, '-o', 'json');
    if (r.code !== 0) throw new Error(`kubectl lockstep ${args.join(' ')}: ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  };
  /** Writes the relationship's status as the operator would. */
  const setStatus = (status: object) =>
    k(
      'patch',
      'lsr',
      'db-sync',
      '-n',
      NS,
      '--subresource=status',
      '--type=merge',
      '-p',
      JSON.stringify({ status }),
    );

  beforeAll(async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-plugin-'));
    cp = await startControlPlane();
    installLockstep(cp.kubeconfig);
    // kubectl finds plugins on PATH; this one runs on the runtime we ship.
    const bin = path.join(root, 'bin');
    execFileSync('mkdir', ['-p', bin]);
    const wrapper = path.join(bin, 'kubectl-lockstep');
    writeFileSync(
      wrapper,
      `#!/bin/sh\nexec ${productNode()} ${path.join(packageRoot, 'bin', 'kubectl-lockstep')} "$@"\n`,
    );
    chmodSync(wrapper, 0o755);
    env = { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}`, KUBECONFIG: cp.kubeconfig };
    k('create', 'namespace', NS);
    apply(
      {
        apiVersion: 'v1',
        kind: 'List',
        items: [
          {
            apiVersion: 'v1',
            kind: 'PersistentVolumeClaim',
            metadata: { name: 'db-data', namespace: NS },
            spec: { accessModes: ['ReadWriteOnce'], resources: { requests: { storage: '1Gi' } } },
          },
          oneVolumeGroup('db', NS, 'db-data'),
          syncRelationship('db-sync', NS, 'db', 'node-a', ['node-b', 'node-c'], {
            mode: 'Sync',
            failover: { mediator: 'mediator.lockstep-system:7450', policy: 'Manual' },
          }),
        ],
      },
      cp.kubeconfig,
    );
    setStatus({
      phase: 'Baselining',
      primaryNode: 'node-a',
      dirtyBytes: 0,
      copies: [
        {
          node: 'node-b',
          state: 'Baselining',
          dirtyBytes: 0,
          doneBytes: GiB,
          totalBytes: 4 * GiB,
          etaSeconds: 90,
        },
        { node: 'node-c', state: 'InSync', dirtyBytes: 0 },
      ],
      failover: {
        mediator: 'mediator.lockstep-system:7450',
        epoch: 1,
        exports: [
          { volume: 'data', uri: 'nbd+unix:///shop.db.data?socket=/run/lockstep/nbd.sock' },
        ],
      },
    });
  });
  afterAll(async () => {
    await cp?.stop();
    if (root) removeDir(root);
  });

  it('shows each relationship’s copies with progress and ETA, for people and as JSON', async () => {
    const table = await plugin('status', '-n', NS);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(
      /^NAME\s+MODE\s+PHASE\s+PRIMARY\s+COPIES\s+DIRTY\s+LAST IN SYNC$/m,
    );
    expect(table.stdout).toMatch(
      /^db-sync\s+Sync\s+Baselining\s+node-a\s+node-b Baselining 25% ETA 1m30s, node-c InSync\s+0B\s+never$/m,
    );
    const { relationships } = await json<{
      relationships: { name: string; copies: unknown[]; progress: unknown }[];
    }>('status', '-A');
    expect(relationships).toEqual([
      expect.objectContaining({
        name: 'db-sync',
        namespace: NS,
        phase: 'Baselining',
        progress: { doneBytes: GiB, totalBytes: 4 * GiB, etaSeconds: 90 },
      }),
    ]);
    const missing = await plugin('status', 'nope', '-n', NS);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/404.*nope/);
  });

  it('says which relationship protects a PVC and where its copies are', async () => {
    const text = await plugin('pvc', 'db-data', '-n', NS);
    expect(text.stdout).toContain('PVC shop/db-data is volume data of ConsistencyGroup db');
    expect(text.stdout).toContain('protected by SyncRelationship db-sync (Sync, Baselining)');
    expect(text.stdout).toContain('export: nbd+unix:///shop.db.data?socket=/run/lockstep/nbd.sock');
    const j = await json<{
      groups: { group: string; volume: string; relationships: { name: string }[] }[];
    }>('pvc', 'db-data', '-n', NS);
    expect(j.groups).toEqual([
      expect.objectContaining({
        group: 'db',
        volume: 'data',
        relationships: [expect.objectContaining({ name: 'db-sync' })],
      }),
    ]);
  });

  it('waits for InSync with a live progress bar in a terminal', async () => {
    const session = `lockstep-${process.pid}`;
    const exitFile = path.join(root, 'wait.exit');
    const script = path.join(root, 'wait.sh');
    writeFileSync(
      script,
      `#!/bin/sh\nexport PATH='${env.PATH ?? ''}' KUBECONFIG='${cp.kubeconfig}'\nkubectl lockstep wait db-sync -n ${NS} --timeout 2m\necho $? > ${exitFile}\nsleep 600\n`,
    );
    chmodSync(script, 0o755);
    execFileSync('tmux', ['new-session', '-d', '-s', session, '-x', '120', '-y', '10', script]);
    const pane = () =>
      execFileSync('tmux', ['capture-pane', '-p', '-t', session], { encoding: 'utf8' });
    try {
      const drawn = await waitFor(
        'the bar at 25%',
        () => Promise.resolve(/25%/.test(pane()) ? pane() : undefined),
        20_000,
        200,
      );
      expect(drawn).toMatch(/db-sync Baselining\s+\[#+\.+\] 25% \| 1GiB of 4GiB \| ETA 1m30s/);
      setStatus({
        copies: [
          {
            node: 'node-b',
            state: 'Baselining',
            dirtyBytes: 0,
            doneBytes: 3 * GiB,
            totalBytes: 4 * GiB,
            etaSeconds: 20,
          },
          { node: 'node-c', state: 'InSync', dirtyBytes: 0 },
        ],
      });
      const moved = await waitFor(
        'the bar at 75%',
        () => Promise.resolve(/75%/.test(pane()) ? pane() : undefined),
        20_000,
        200,
      );
      expect(moved).toMatch(/\[#+\.*\] 75% \| 3GiB of 4GiB \| ETA 20s/);
      setStatus({
        phase: 'InSync',
        copies: [
          { node: 'node-b', state: 'InSync', dirtyBytes: 0 },
          { node: 'node-c', state: 'InSync', dirtyBytes: 0 },
        ],
      });
      await waitFor(
        'wait to exit',
        () => Promise.resolve(existsSync(exitFile) || undefined),
        20_000,
        200,
      );
      expect(readFileSync(exitFile, 'utf8').trim()).toBe('0');
      expect(pane()).toContain('shop/db-sync is InSync');
    } finally {
      execFileSync('tmux', ['kill-session', '-t', session]);
    }
    // Not a terminal: a line per change, for logs; a timeout is exit 1 with why.
    const timedOut = await plugin(
      'wait',
      'db-sync',
      '-n',
      NS,
      '--for',
      'Degraded',
      '--timeout',
      '2s',
    );
    expect(timedOut.code).toBe(1);
    expect(timedOut.stderr).toMatch(
      /db-sync: InSync\n[\s\S]*timed out after 2s: shop\/db-sync is InSync, not Degraded/,
    );
  });

  it('switches over only when every copy is in sync, and fails over only through a mediator', async () => {
    setStatus({ phase: 'Degraded' });
    const refused = await plugin('switchover', 'db-sync', '-n', NS, '--to', 'node-b');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(
      /shop\/db-sync is Degraded: a switchover needs every copy in sync \(if the primary is lost, use failover\)/,
    );
    expect((await plugin('switchover', 'db-sync', '-n', NS, '--to', 'node-x')).stderr).toMatch(
      /node-x holds no copy of shop\/db-sync/,
    );

    const failed = await json<{ toNode: string; fromNode: string }>(
      'failover',
      'db-sync',
      '-n',
      NS,
      '--to',
      'node-c',
    );
    expect(failed).toMatchObject({ fromNode: 'node-a', toNode: 'node-c' });
    const rel = JSON.parse(k('get', 'lsr', 'db-sync', '-n', NS, '-o', 'json')) as {
      spec: { primary: string };
      metadata: { annotations: Record<string, string> };
    };
    expect(rel.spec.primary).toBe('node-c');
    expect(JSON.parse(rel.metadata.annotations['lockstep.dev/failover'] ?? '{}')).toMatchObject({
      fromNode: 'node-a',
      toNode: 'node-c',
      reason: 'requested with kubectl lockstep failover',
    });

    setStatus({ phase: 'InSync', primaryNode: 'node-c' });
    expect((await plugin('switchover', 'db-sync', '-n', NS, '--to', 'node-a')).code).toBe(0);
    expect(k('get', 'lsr', 'db-sync', '-n', NS, '-o', 'jsonpath={.spec.primary}')).toBe('source');

    k(
      'patch',
      'lsr',
      'db-sync',
      '-n',
      NS,
      '--type=json',
      '-p',
      '[{"op":"remove","path":"/spec/failover"}]',
    );
    expect((await plugin('failover', 'db-sync', '-n', NS, '--to', 'node-b')).stderr).toMatch(
      /has no mediator/,
    );
  });

  it('creates and lists snapshots, and verifies the copies', async () => {
    expect(
      (
        await plugin(
          'snapshot',
          'create',
          'db-sync',
          'before-upgrade',
          '-n',
          NS,
          '--label',
          'manual',
        )
      ).stdout,
    ).toContain('replicatedsnapshot shop/before-upgrade of group db created');
    const verifying = plugin(
      'verify',
      'db-sync',
      '-n',
      NS,
      '--name',
      'db-verified',
      '--timeout',
      '1m',
    );
    await waitFor(
      'the verification snapshot',
      () =>
        Promise.resolve(
          k('get', 'lrs', '-n', NS, '-o', 'name').includes('db-verified') || undefined,
        ),
      20_000,
      200,
    );
    expect(k('get', 'lrs', 'db-verified', '-n', NS, '-o', 'jsonpath={.spec.verify}')).toBe('true');
    k(
      'patch',
      'lrs',
      'db-verified',
      '-n',
      NS,
      '--subresource=status',
      '--type=merge',
      '-p',
      JSON.stringify({
        status: {
          phase: 'Ready',
          verification: {
            generation: 1,
            result: 'Identical',
            completionTime: new Date().toISOString(),
            regionSize: 1 << 20,
            differingRegions: 0,
            message: '3 copies, 64 regions',
          },
        },
      }),
    );
    const verified = await verifying;
    expect(verified).toMatchObject({ code: 0 });
    expect(verified.stdout).toContain('shop/db-verified: Identical (3 copies, 64 regions)');
    const { snapshots } = await json<{
      snapshots: { name: string; label: string; group: string }[];
    }>('snapshot', 'list', 'db-sync', '-n', NS);
    expect(snapshots.map((s) => [s.name, s.group, s.label]).sort()).toEqual([
      ['before-upgrade', 'db', 'manual'],
      ['db-verified', 'db', 'verify'],
    ]);
  });

  it('preflight says what each node lacks, and fails when something does', async () => {
    for (const node of ['node-a', 'node-b'])
      apply({ apiVersion: 'v1', kind: 'Node', metadata: { name: node } }, cp.kubeconfig);
    apply(
      {
        apiVersion: 'lockstep.dev/v1alpha1',
        kind: 'LockstepNode',
        metadata: { name: 'node-a' },
        spec: { endpoint: '10.0.0.1:7400', version: '0.1.0', capacityBytes: 100 * GiB },
      },
      cp.kubeconfig,
    );
    k(
      'patch',
      'lockstepnode',
      'node-a',
      '--subresource=status',
      '--type=merge',
      '-p',
      JSON.stringify({
        status: {
          conditions: [
            {
              type: 'Ready',
              status: 'True',
              reason: 'HeartbeatFresh',
              message: 'lease renewed 2s ago',
              lastTransitionTime: new Date().toISOString(),
            },
          ],
        },
      }),
    );
    const r = await plugin('preflight', '-o', 'json');
    expect(r.code).toBe(1);
    const { ok, checks } = JSON.parse(r.stdout) as {
      ok: boolean;
      checks: { scope: string; check: string; ok: boolean; detail: string }[];
    };
    expect(ok).toBe(false);
    const find = (scope: string, check: string) =>
      checks.find((c) => c.scope === scope && c.check === check);
    expect(find('cluster', 'CRDs installed')?.ok).toBe(true);
    expect(find('cluster', 'operator leading')).toMatchObject({
      ok: false,
      detail: expect.stringMatching(/no leader Lease in lockstep-system/) as string,
    });
    expect(find('node-a', 'agent heartbeating')?.ok).toBe(true);
    expect(find('node-a', 'data dir space')?.ok).toBe(true);
    expect(find('node-b', 'agent registered')).toMatchObject({
      ok: false,
      detail: expect.stringMatching(/no LockstepNode: no agent runs here/) as string,
    });
    expect((await plugin('preflight')).stdout).toMatch(
      /^node-b\s+agent registered\s+NO\s+no LockstepNode/m,
    );
  });

  it('collects a support bundle', async () => {
    const archive = path.join(root, 'bundle.tar.gz');
    const r = await json<{ files: string[] }>('support-bundle', '--out', archive);
    expect(r.files).toEqual(
      expect.arrayContaining([
        'syncrelationships.yaml',
        'consistencygroups.yaml',
        'lockstepnodes.yaml',
        `events/${NS}.yaml`,
        'leases.yaml',
        'pods.yaml',
        'README.txt',
      ]),
    );
    const listing = execFileSync('tar', ['-tzf', archive], { encoding: 'utf8' });
    expect(listing).toContain('lockstep-support/syncrelationships.yaml');
    const rels = execFileSync(
      'tar',
      ['-xzOf', archive, 'lockstep-support/syncrelationships.yaml'],
      { encoding: 'utf8' },
    );
    expect(rels).toContain('name: db-sync');
  });
});
