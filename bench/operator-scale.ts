// `npm run bench:operator` (issue 5): many SyncRelationships on small volumes across a few
// agents, on a real control plane (etcd, kube-apiserver, the PV controller), agents and the
// operator as real processes with their deploy/rbac ServiceAccounts. Reports how long until every
// relationship is InSync, what that cost in API requests (from the apiserver's audit log, so
// the operator's own accounting is not trusted), and what the operator and agents write at rest.
//
// usage: node dist/bench/operator-scale.js [--relationships 500] [--agents 3] [--rest 60]
//          [--size 1Mi] [--append docs/BENCHMARKS.md] [--keep-logs DIR] [--operator-cpu-prof]
import { execFile, execFileSync } from 'node:child_process';
import {
  appendFileSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  readdirSync,
  closeSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { packageRoot } from '../lib/package-root';
import type { AgentProcess } from '../test/harness/agent-process';
import {
  NAMESPACE,
  OperatorProcess,
  clusterAgent,
  installLockstep,
  localPv,
  nodeDisk,
  pvc,
  removeDir,
  serviceAccountKubeconfig,
} from '../test/harness/cluster';
import { kubectl, startControlPlane, type ControlPlane } from '../test/harness/control-plane';
import { waitFor } from '../test/harness/processes';

const NS = 'bench';
const OPERATOR_USER = `system:serviceaccount:${NAMESPACE}:lockstep-operator`;
const AGENT_USER = `system:serviceaccount:${NAMESPACE}:lockstep-agent`;
const WRITES = new Set(['create', 'update', 'patch', 'delete', 'deletecollection']);
const READS = new Set(['get', 'list', 'watch']);

interface AuditEvent {
  verb: string;
  stage: string;
  user: { username: string };
  objectRef?: { resource?: string; subresource?: string; name?: string; namespace?: string };
}

interface RelationshipItem {
  metadata: { name: string; creationTimestamp?: string };
  status?: { phase?: string };
}

export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

function testTools(): void {
  // test/harness/test-tools.ts finds scripts/ relative to its own file, which from dist/ is one
  // level off; the package root is found by marker files instead, so this works from both.
  if (process.env.LOCKSTEP_TEST_BIN && existsSync(process.env.LOCKSTEP_TEST_BIN)) return;
  process.env.LOCKSTEP_TEST_BIN = execFileSync(
    'bash',
    [path.join(packageRoot, 'scripts', 'test-tools.sh')],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
  ).trim();
}

function kubectlAsync(kubeconfig: string, args: string[], input: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      path.join(process.env.LOCKSTEP_TEST_BIN ?? '', 'kubectl'),
      [`--kubeconfig=${kubeconfig}`, ...args],
      { maxBuffer: 256 << 20 },
      (err, stdout, stderr) =>
        err ? reject(new Error(`kubectl ${args.join(' ')}: ${stderr}`)) : resolve(stdout),
    );
    child.stdin?.end(input);
  });
}

/** A plain GET as admin: much cheaper than a kubectl process per poll on a 2-core machine. */
function getList<T>(cp: ControlPlane, urlPath: string): Promise<{ items: T[] }> {
  return new Promise((resolve, reject) => {
    const req = https.get(
      `${cp.server}${urlPath}`,
      { headers: { Authorization: `Bearer ${cp.token}` }, ca: readFileSync(cp.caFile) },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200)
            reject(new Error(`GET ${urlPath}: ${res.statusCode} ${body}`));
          else resolve(JSON.parse(body) as { items: T[] });
        });
      },
    );
    req.on('error', reject);
  });
}

/** Reconcile passes of the SyncRelationship controller, by outcome, from the operator's metrics. */
function reconcileCounts(metrics: string): { total: number; outcomes: string; meanMs: number } {
  const byOutcome: Array<[string, number]> = [];
  for (const m of metrics.matchAll(/^lockstep_operator_reconcile_total\{([^}]*)\} (\d+)/gm)) {
    if (!m[1].includes('controller="syncrelationship"')) continue;
    byOutcome.push([/result="([^"]*)"/.exec(m[1])?.[1] ?? '?', Number(m[2])]);
  }
  const sum = (metric: string) =>
    Number(
      new RegExp(`^${metric}\\{controller="syncrelationship"\\} ([\\d.e+-]+)`, 'm').exec(
        metrics,
      )?.[1] ?? NaN,
    );
  const seconds = sum('lockstep_operator_reconcile_duration_seconds_sum');
  const count = sum('lockstep_operator_reconcile_duration_seconds_count');
  return {
    total: byOutcome.reduce((a, [, v]) => a + v, 0),
    outcomes: byOutcome.map(([k, v]) => `${k} ${v}`).join(', '),
    meanMs: (seconds / count) * 1000,
  };
}

const auditFile = (cp: ControlPlane) => path.join(cp.dir, 'audit.log');
const auditSize = (cp: ControlPlane) => statSync(auditFile(cp)).size;

/**
 * Audit events between two offsets of the log. A watch only reaches ResponseComplete when it
 * ends, so watches opened in the window are counted at ResponseStarted instead.
 */
function auditBetween(cp: ControlPlane, from: number, to: number): AuditEvent[] {
  const fd = openSync(auditFile(cp), 'r');
  const buf = Buffer.alloc(to - from);
  try {
    readSync(fd, buf, 0, buf.length, from);
  } finally {
    closeSync(fd);
  }
  return buf
    .toString('utf8')
    .split('\n')
    .flatMap((l) => {
      // An offset taken while the apiserver writes can fall inside a line.
      try {
        return [JSON.parse(l) as AuditEvent];
      } catch {
        return [];
      }
    })
    .filter((e) =>
      e.verb === 'watch' ? e.stage === 'ResponseStarted' : e.stage === 'ResponseComplete',
    );
}

const resourceOf = (e: AuditEvent) =>
  `${e.verb} ${e.objectRef?.resource ?? '?'}${e.objectRef?.subresource ? `/${e.objectRef.subresource}` : ''}`;

function countBy<T>(xs: T[], key: (x: T) => string): Array<[string, number]> {
  const m = new Map<string, number>();
  for (const x of xs) m.set(key(x), (m.get(key(x)) ?? 0) + 1);
  return [...m].sort((a, b) => b[1] - a[1]);
}

function manifestList(items: object[]): string {
  return JSON.stringify({ apiVersion: 'v1', kind: 'List', items });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      relationships: { type: 'string', default: '500' },
      agents: { type: 'string', default: '3' },
      rest: { type: 'string', default: '60' },
      size: { type: 'string', default: '1Mi' },
      timeout: { type: 'string', default: '600' },
      append: { type: 'string' },
      'keep-logs': { type: 'string' },
      'operator-cpu-prof': { type: 'boolean', default: false },
    },
  });
  const n = Number(values.relationships);
  const agentCount = Number(values.agents);
  const restSeconds = Number(values.rest);
  const size = values.size;
  const log = (msg: string) =>
    process.stderr.write(`${new Date().toISOString().slice(11, 23)} ${msg}\n`);

  testTools();
  let cp: ControlPlane | undefined;
  let root: string | undefined;
  const agents: AgentProcess[] = [];
  let operator: OperatorProcess | undefined;
  const cleanup = async () => {
    if (values['keep-logs']) keepLogs(values['keep-logs'], root, cp, operator, agents);
    await operator?.dispose();
    await Promise.all(agents.map((a) => a.dispose()));
    await cp?.stop();
    if (root) removeDir(root);
  };
  // Ctrl-C during a 10-minute run must not leave etcd and apiservers behind.
  const onSignal = () => void cleanup().finally(() => process.exit(130));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    log('starting the control plane');
    const plane = await startControlPlane({ controllers: ['persistentvolume-binder'] });
    cp = plane;
    process.env.LOCKSTEP_TEST_KUBECONFIG = cp.kubeconfig;
    process.env.LOCKSTEP_TEST_CP_DIR = cp.dir;
    const admin = cp.kubeconfig;
    installLockstep();
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-operator-'));
    const operatorKc = serviceAccountKubeconfig(root, 'lockstep-operator');
    const agentKc = serviceAccountKubeconfig(root, 'lockstep-agent');
    const nodes = Array.from({ length: agentCount }, (_, k) => `bench-node-${k}`);
    log(`starting ${agentCount} agents`);
    for (const node of nodes) agents.push(clusterAgent(node, agentKc));
    await Promise.all(agents.map((a) => a.start()));
    kubectl(admin, ['create', 'namespace', NS]);

    log(`creating ${n} local PVs and PVCs (${size})`);
    const storage: object[] = [];
    for (let i = 0; i < n; i++) {
      const node = nodes[i % agentCount];
      const dir = nodeDisk(root, node, `pv-${i}`);
      storage.push(
        localPv(`bench-pv-${i}`, node, dir, size),
        pvc(`vol-${i}`, NS, `bench-pv-${i}`, size),
      );
    }
    let t = performance.now();
    await kubectlAsync(admin, ['apply', '-f', '-'], manifestList(storage));
    log(`applied in ${((performance.now() - t) / 1000).toFixed(1)} s; waiting for Bound`);
    await waitFor(
      `${n} PVCs Bound`,
      async () => {
        const list = await getList<{ status?: { phase?: string } }>(
          plane,
          `/api/v1/namespaces/${NS}/persistentvolumeclaims`,
        );
        const bound = list.items.filter((p) => p.status?.phase === 'Bound').length;
        return bound === n ? true : undefined;
      },
      300_000,
      500,
    );
    log(`all bound after ${((performance.now() - t) / 1000).toFixed(1)} s`);

    await waitFor(
      `${agentCount} LockstepNodes`,
      async () => {
        const list = await getList(plane, '/apis/lockstep.dev/v1alpha1/lockstepnodes');
        return list.items.length >= agentCount ? true : undefined;
      },
      30_000,
      200,
    );
    const profFile = path.join(root, 'operator.cpuprofile');
    const nodeOptions = process.env.NODE_OPTIONS;
    if (values['operator-cpu-prof']) {
      // Only the operator is profiled: the variable is read at spawn and removed right after.
      process.env.NODE_OPTIONS = `${nodeOptions ?? ''} --require ${writeProfilerHook(root, profFile)}`;
    }
    operator = new OperatorProcess('operator', operatorKc);
    await operator.start();
    if (nodeOptions === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = nodeOptions;
    await operator.leading();
    // The operator's start-up lists and first node reconciles are not what is measured.
    await new Promise((r) => setTimeout(r, 2_000));

    const objects: object[] = [];
    for (let i = 0; i < n; i++) {
      objects.push(
        {
          apiVersion: 'lockstep.dev/v1alpha1',
          kind: 'ConsistencyGroup',
          metadata: { name: `cg-${i}`, namespace: NS },
          spec: { volumes: [{ name: 'data', pvc: `vol-${i}` }] },
        },
        {
          apiVersion: 'lockstep.dev/v1alpha1',
          kind: 'SyncRelationship',
          metadata: { name: `sr-${i}`, namespace: NS },
          spec: {
            consistencyGroup: `cg-${i}`,
            source: { node: nodes[i % agentCount] },
            targets: [{ node: nodes[(i + 1) % agentCount] }],
          },
        },
      );
    }

    log(`applying ${n} ConsistencyGroups + SyncRelationships`);
    const auditFrom = auditSize(cp);
    const t0 = Date.now();
    t = performance.now();
    let applySeconds = NaN;
    const applied = kubectlAsync(admin, ['apply', '-f', '-'], manifestList(objects)).then(() => {
      applySeconds = (performance.now() - t) / 1000;
      log(`kubectl apply returned after ${applySeconds.toFixed(1)} s`);
    });
    const seenInSync = new Map<string, number>();
    const created = new Map<string, number>();
    let firstInSync = NaN;
    let polls = 0;
    let pollMs = 0;
    let lastReport = 0;
    const timeoutMs = Number(values.timeout) * 1000;
    for (;;) {
      const p0 = performance.now();
      const list = await getList<RelationshipItem>(
        cp,
        `/apis/lockstep.dev/v1alpha1/namespaces/${NS}/syncrelationships`,
      );
      pollMs += performance.now() - p0;
      polls++;
      const now = Date.now();
      for (const r of list.items) {
        const name = r.metadata.name;
        if (!created.has(name) && r.metadata.creationTimestamp)
          created.set(name, Date.parse(r.metadata.creationTimestamp));
        if (r.status?.phase === 'InSync' && !seenInSync.has(name)) {
          seenInSync.set(name, now);
          if (Number.isNaN(firstInSync)) firstInSync = (now - t0) / 1000;
        }
      }
      if (seenInSync.size >= n) break;
      if (now - lastReport > 5_000) {
        const phases = countBy(list.items, (r) => r.status?.phase ?? 'none');
        log(
          `${((now - t0) / 1000).toFixed(0)} s: ${phases.map(([k, v]) => `${k}=${v}`).join(' ')}`,
        );
        lastReport = now;
      }
      if (now - t0 > timeoutMs) throw new Error(`not all InSync after ${values.timeout} s`);
      await new Promise((r) => setTimeout(r, 500));
    }
    const totalSeconds = (Date.now() - t0) / 1000;
    await applied;
    const auditTo = auditSize(cp);
    const reconciles = reconcileCounts(await operator.scrape());
    if (values['operator-cpu-prof']) {
      operator.proc.child.kill('SIGUSR2');
      await waitFor(
        'the operator CPU profile',
        () => Promise.resolve(existsSync(profFile) || undefined),
        30_000,
      );
      log(`operator CPU profile of the timed window: ${profFile}`);
    }
    log(`all ${n} InSync after ${totalSeconds.toFixed(1)} s`);
    // creationTimestamp has whole-second resolution: per-relationship times carry up to 1 s of
    // rounding, which is why apply-relative times are reported next to them.
    const perRel = [...seenInSync].map(([name, at]) => (at - (created.get(name) ?? t0)) / 1000);
    const sinceApply = [...seenInSync.values()].map((at) => (at - t0) / 1000);

    const window = auditBetween(cp, auditFrom, auditTo);
    const byOperator = window.filter((e) => e.user.username === OPERATOR_USER);
    const opWrites = byOperator.filter((e) => WRITES.has(e.verb));
    const opReads = byOperator.filter((e) => READS.has(e.verb));

    log(`at rest for ${restSeconds} s`);
    await new Promise((r) => setTimeout(r, 5_000));
    const restFrom = auditSize(cp);
    await new Promise((r) => setTimeout(r, restSeconds * 1000));
    const rest = auditBetween(cp, restFrom, auditSize(cp)).filter((e) => WRITES.has(e.verb));
    const restOperator = rest.filter((e) => e.user.username === OPERATOR_USER);
    const leaderLease = restOperator.filter(
      (e) => e.objectRef?.resource === 'leases' && e.objectRef.name === 'lockstep-operator',
    );
    const restOperatorOther = restOperator.filter((e) => !leaderLease.includes(e));
    const restAgents = rest.filter((e) => e.user.username === AGENT_USER);
    const restAgentsOther = restAgents.filter((e) => e.objectRef?.resource !== 'leases');
    const perMin = (k: number) => ((k * 60) / restSeconds).toFixed(1);

    const f1 = (x: number) => x.toFixed(1);
    const f2 = (x: number) => x.toFixed(2);
    const when = new Date().toISOString().slice(0, 16).replace('T', ' ');
    const met = totalSeconds <= 60 && restOperatorOther.length === 0;
    const section = [
      `### ${when} UTC — ${n} relationships, ${agentCount} agents, ${size} volumes, ${os.cpus().length} cores`,
      '',
      `| figure | value |`,
      `|---|---|`,
      `| all InSync, from kubectl apply | **${f1(totalSeconds)} s** (target ≤ 60 s: ${totalSeconds <= 60 ? 'met' : 'missed'}) |`,
      `| first InSync, from kubectl apply | ${f1(firstInSync)} s |`,
      `| kubectl apply of ${2 * n} objects returned after | ${f1(applySeconds)} s |`,
      `| per relationship, creationTimestamp → seen InSync: p50 / p95 / max | ${f1(percentile(perRel, 50))} / ${f1(percentile(perRel, 95))} / ${f1(Math.max(...perRel))} s |`,
      `| per relationship, apply → seen InSync: p50 / p95 | ${f1(percentile(sinceApply, 50))} / ${f1(percentile(sinceApply, 95))} s |`,
      `| operator API requests in that window (per relationship) | ${byOperator.length} (${f2(byOperator.length / n)}) |`,
      `| — writes (per relationship) | ${opWrites.length} (${f2(opWrites.length / n)}) |`,
      `| — reads: get/list/watch (per relationship) | ${opReads.length} (${f2(opReads.length / n)}) |`,
      `| at rest ${restSeconds} s: operator writes besides its leader Lease | **${restOperatorOther.length}** (${perMin(restOperatorOther.length)}/min; target 0) |`,
      `| at rest: operator leader-Lease renewals | ${leaderLease.length} (${perMin(leaderLease.length)}/min) |`,
      `| at rest: agent writes (${agentCount} agents), of which not their heartbeat Lease | ${restAgents.length} (${perMin(restAgents.length)}/min), ${restAgentsOther.length} |`,
      `| SyncRelationship reconcile passes until all InSync (per relationship) | ${reconciles.total} (${f2(reconciles.total / n)}): ${reconciles.outcomes}; ${f1(reconciles.meanMs)} ms each on average |`,
      `| status polls (admin GET of the list, every 500 ms) | ${polls}, ${f1(pollMs / polls)} ms each |`,
      '',
      `Operator writes by verb and resource during the window: ${countBy(opWrites, resourceOf)
        .map(([k, v]) => `${k} ${v} (${f2(v / n)}/rel)`)
        .join('; ')}.`,
      '',
      `Operator reads: ${
        countBy(opReads, resourceOf)
          .map(([k, v]) => `${k} ${v}`)
          .join('; ') || 'none'
      }.`,
      ...(restOperatorOther.length
        ? [
            '',
            `Operator writes at rest: ${countBy(restOperatorOther, resourceOf)
              .map(([k, v]) => `${k} ${v}`)
              .join('; ')}.`,
          ]
        : []),
      '',
    ].join('\n');
    process.stdout.write(section);
    if (values.append) {
      const doc = values.append;
      const heading = '## Operator at scale (issue 5)';
      if (!readFileSync(doc, 'utf8').includes(heading)) {
        appendFileSync(
          doc,
          [
            '',
            heading,
            '',
            'Target (issue 5): 500 SyncRelationships on small volumes across 3 agents all InSync',
            '≤ 60 s after they are applied, and 0 operator writes/min at rest.',
            '',
          ].join('\n'),
        );
      }
      appendFileSync(doc, `\n${section}`);
    }
    if (!met) process.exitCode = 2;
  } finally {
    await cleanup();
  }
}

/**
 * A preload for the operator: Node refuses --cpu-prof in NODE_OPTIONS, and the operator is
 * SIGKILLed at the end, so the profile covers start → SIGUSR2 and is written on that signal.
 */
function writeProfilerHook(dir: string, out: string): string {
  const file = path.join(dir, 'cpu-profile-hook.js');
  writeFileSync(
    file,
    `const inspector = require('node:inspector');
const fs = require('node:fs');
const session = new inspector.Session();
session.connect();
session.post('Profiler.enable', () => session.post('Profiler.start'));
process.on('SIGUSR2', () =>
  session.post('Profiler.stop', (err, res) => {
    const tmp = ${JSON.stringify(out)} + '.tmp';
    fs.writeFileSync(tmp, err ? JSON.stringify({ error: String(err) }) : JSON.stringify(res.profile));
    fs.renameSync(tmp, ${JSON.stringify(out)});
  }),
);
`,
  );
  return file;
}

function keepLogs(
  dir: string,
  root: string | undefined,
  cp: ControlPlane | undefined,
  operator: OperatorProcess | undefined,
  agents: AgentProcess[],
): void {
  mkdirSync(dir, { recursive: true });
  const copy = (from: string) => {
    if (existsSync(from)) copyFileSync(from, path.join(dir, path.basename(from)));
  };
  if (operator) for (const f of readdirSync(operator.dir)) copy(path.join(operator.dir, f));
  for (const a of agents)
    for (const f of readdirSync(a.dataDir).filter((f) => f.endsWith('.log')))
      copyFileSync(path.join(a.dataDir, f), path.join(dir, `${a.node}.${f}`));
  if (cp) {
    copy(path.join(cp.dir, 'kube-apiserver.log'));
    copy(path.join(cp.dir, 'audit.log'));
  }
  if (root) copy(path.join(root, 'operator.cpuprofile'));
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
