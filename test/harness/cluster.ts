// A Lockstep installation on the test control plane, the way a user's cluster would have it:
// CRDs and RBAC from deploy/, agents and operators as real processes running with their own
// ServiceAccount tokens (TokenRequest), "nodes" as separate data dirs, local PVs on them.
import { tlsDirFor } from './test-certificates';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';
import { AgentProcess, lockstepBin, repoRoot } from './agent-process';
import { kubectl, writeKubeconfig } from './control-plane';
import { freePort, startProcess, waitFor, type ManagedProcess } from './processes';
import { productNode } from './product-runtime';

export const NAMESPACE = 'lockstep-system';

export function adminKubeconfig(): string {
  const file = process.env.LOCKSTEP_TEST_KUBECONFIG;
  if (!file) throw new Error('LOCKSTEP_TEST_KUBECONFIG is not set: run this in the k8s project');
  return file;
}

export function apply(manifest: object | string): string {
  return kubectl(
    adminKubeconfig(),
    ['apply', '-f', '-'],
    typeof manifest === 'string' ? manifest : JSON.stringify(manifest),
  );
}

/** Applies deploy/crds and deploy/rbac and waits until the CRDs serve. */
export function installLockstep(): void {
  const kc = adminKubeconfig();
  kubectl(kc, ['apply', '-f', path.join(repoRoot, 'deploy', 'rbac', 'namespace.yaml')]);
  kubectl(kc, ['apply', '-f', path.join(repoRoot, 'deploy', 'crds')]);
  kubectl(kc, ['apply', '-f', path.join(repoRoot, 'deploy', 'rbac')]);
  kubectl(kc, [
    'wait',
    '--for=condition=Established',
    '--timeout=30s',
    'crd',
    'syncrelationships.lockstep.dev',
    'consistencygroups.lockstep.dev',
    'lockstepnodes.lockstep.dev',
    'replicatedsnapshots.lockstep.dev',
  ]);
}

/** A kubeconfig that authenticates as a ServiceAccount of deploy/rbac, with a fresh token. */
export function serviceAccountKubeconfig(dir: string, serviceAccount: string): string {
  const admin = new KubeConfig();
  admin.loadFromFile(adminKubeconfig());
  const cluster = admin.getCurrentCluster();
  if (!cluster?.caData) throw new Error('the admin kubeconfig has no CA data');
  const caFile = path.join(dir, 'ca.crt');
  writeFileSync(caFile, Buffer.from(cluster.caData, 'base64'));
  const token = kubectl(adminKubeconfig(), [
    'create',
    'token',
    serviceAccount,
    '-n',
    NAMESPACE,
    '--duration=2h',
  ]).trim();
  const file = path.join(dir, `${serviceAccount}.kubeconfig`);
  writeKubeconfig(file, cluster.server, caFile, token, serviceAccount);
  return file;
}

/** An agent standing in for the DaemonSet pod of one node. */
export function clusterAgent(node: string, kubeconfig: string): AgentProcess {
  return new AgentProcess({
    node,
    extraArgs: [
      '--peer-timeout',
      '1500',
      '--register',
      '--kubeconfig',
      kubeconfig,
      '--namespace',
      NAMESPACE,
    ],
  });
}

export class OperatorProcess {
  proc!: ManagedProcess;
  metricsPort = 0;
  private starts = 0;
  readonly dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-operator-'));

  constructor(
    readonly name: string,
    private readonly kubeconfig: string,
  ) {}

  async start(): Promise<this> {
    this.metricsPort ||= await freePort();
    const tlsDir = await tlsDirFor({ role: 'operator', name: 'lockstep-operator' });
    this.proc = startProcess(
      this.name,
      productNode(),
      [
        lockstepBin,
        'operator',
        '--kubeconfig',
        this.kubeconfig,
        '--namespace',
        NAMESPACE,
        '--leader-elect',
        '--agent-poll',
        '500',
        '--metrics-listen',
        `127.0.0.1:${this.metricsPort}`,
        '--tls-dir',
        tlsDir,
      ],
      path.join(this.dir, `operator.${++this.starts}.log`),
    );
    return this;
  }

  async scrape(): Promise<string> {
    const res = await fetch(`http://127.0.0.1:${this.metricsPort}/metrics`);
    return res.text();
  }

  /** Waits until this replica logs that it leads. */
  async leading(timeoutMs = 40_000): Promise<void> {
    await waitFor(
      `${this.name} to lead`,
      () => {
        if (this.proc.child.exitCode !== null)
          throw new Error(`operator exited:\n${this.proc.log()}`);
        return Promise.resolve(this.proc.log().includes('"msg":"leading"') || undefined);
      },
      timeoutMs,
      100,
    );
  }

  async dispose(): Promise<void> {
    await this.proc?.kill('SIGKILL');
    // KEEP_AGENT_DIRS=1 keeps its logs too.
    if (!process.env.KEEP_AGENT_DIRS) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A directory standing in for a node's disk, where its local PVs live. */
export function nodeDisk(root: string, node: string, pv: string): string {
  const dir = path.join(root, node, pv);
  mkdirSync(dir, { recursive: true });
  return dir;
}

export function localPv(name: string, node: string, dir: string, size: string): object {
  return {
    apiVersion: 'v1',
    kind: 'PersistentVolume',
    metadata: { name },
    spec: {
      capacity: { storage: size },
      accessModes: ['ReadWriteOnce'],
      persistentVolumeReclaimPolicy: 'Retain',
      storageClassName: 'lockstep-local',
      local: { path: dir },
      nodeAffinity: {
        required: {
          nodeSelectorTerms: [
            {
              matchExpressions: [{ key: 'kubernetes.io/hostname', operator: 'In', values: [node] }],
            },
          ],
        },
      },
    },
  };
}

export function pvc(name: string, namespace: string, pv: string, size: string): object {
  return {
    apiVersion: 'v1',
    kind: 'PersistentVolumeClaim',
    metadata: { name, namespace },
    spec: {
      accessModes: ['ReadWriteOnce'],
      storageClassName: 'lockstep-local',
      volumeName: pv,
      resources: { requests: { storage: size } },
    },
  };
}

export function getJson<T>(...args: string[]): T {
  return JSON.parse(kubectl(adminKubeconfig(), ['get', ...args, '-o', 'json'])) as T;
}

export async function waitBound(namespace: string, names: string[]): Promise<void> {
  await waitFor(
    `PVCs ${names.join(', ')} bound`,
    () => {
      const phases = names.map(
        (n) => getJson<{ status?: { phase?: string } }>('pvc', n, '-n', namespace).status?.phase,
      );
      return Promise.resolve(phases.every((p) => p === 'Bound') || undefined);
    },
    60_000,
    200,
  );
}

export const removeDir = (dir: string): void => rmSync(dir, { recursive: true, force: true });
