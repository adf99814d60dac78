// A Lockstep installation on the test control plane, the way a user's cluster would have it:
// CRDs and RBAC from deploy/, agents and operators as real processes running with their own
// ServiceAccount tokens (TokenRequest), "nodes" as separate data dirs, local PVs on them.
import { tlsDirFor } from './test-certificates';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';
import { AgentProcess, lockstepBin, repoRoot, type AgentProcessOptions } from './agent-process';
import { kubectl, writeKubeconfig } from './control-plane';
import { freePort, startProcess, waitFor, type ManagedProcess } from './processes';
import { productNode } from './product-runtime';

export const NAMESPACE = 'lockstep-system';

export function adminKubeconfig(): string {
  const file = process.env.LOCKSTEP_TEST_KUBECONFIG;
  if (!file) throw new Error('LOCKSTEP_TEST_KUBECONFIG is not set: run this in the k8s project');
  return file;
}

export function apply(manifest: object | string, kubeconfig = adminKubeconfig()): string {
  return kubectl(
    kubeconfig,
    ['apply', '-f', '-'],
    typeof manifest === 'string' ? manifest : JSON.stringify(manifest),
  );
}

/** Applies deploy/crds and deploy/rbac and waits until the CRDs serve. */
export function installLockstep(kc = adminKubeconfig()): void {
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

/**
 * A kubeconfig that authenticates as a ServiceAccount of deploy/rbac, with a fresh token; bound
 * to `pod` if given, as a pod's own projected token is.
 */
export function serviceAccountKubeconfig(
  dir: string,
  serviceAccount: string,
  opts: { kubeconfig?: string; pod?: string } = {},
): string {
  const adminFile = opts.kubeconfig ?? adminKubeconfig();
  const admin = new KubeConfig();
  admin.loadFromFile(adminFile);
  const cluster = admin.getCurrentCluster();
  if (!cluster?.caData) throw new Error('the admin kubeconfig has no CA data');
  const caFile = path.join(dir, 'ca.crt');
  writeFileSync(caFile, Buffer.from(cluster.caData, 'base64'));
  const token = kubectl(adminFile, [
    'create',
    'token',
    serviceAccount,
    '-n',
    NAMESPACE,
    '--duration=2h',
    ...(opts.pod ? ['--bound-object-kind=Pod', `--bound-object-name=${opts.pod}`] : []),
  ]).trim();
  const file = path.join(dir, `${opts.pod ?? serviceAccount}.kubeconfig`);
  writeKubeconfig(file, cluster.server, caFile, token, serviceAccount);
  return file;
}

/**
 * The Pod object of an agent's DaemonSet pod on `node` (nothing runs it: the agent is a process
 * of the test), so that a token can be bound to a pod on that node as a real pod's is.
 */
export function agentPod(node: string, kubeconfig = adminKubeconfig()): string {
  const name = `lockstep-agent-${node}`;
  apply(
    {
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name, namespace: NAMESPACE, labels: { app: 'lockstep-agent' } },
      spec: {
        nodeName: node,
        serviceAccountName: 'lockstep-agent',
        containers: [{ name: 'agent', image: 'lockstep:test' }],
      },
    },
    kubeconfig,
  );
  return name;
}

/** An agent standing in for the DaemonSet pod of one node. */
export function clusterAgent(
  node: string,
  kubeconfig: string,
  opts: Pick<AgentProcessOptions, 'tls' | 'host'> = {},
): AgentProcess {
  return new AgentProcess({
    ...opts,
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
    /** --manage-certificates with this --certificate-lifetime, instead of the test CA. */
    private readonly managed?: { lifetime: string },
  ) {}

  /** Its TLS directory when it manages certificates. */
  get tlsDir(): string {
    return path.join(this.dir, 'tls');
  }

  async start(): Promise<this> {
    this.metricsPort ||= await freePort();
    const tls = this.managed
      ? [
          '--manage-certificates',
          '--certificate-lifetime',
          this.managed.lifetime,
          '--tls-dir',
          this.tlsDir,
        ]
      : ['--tls-dir', await tlsDirFor({ role: 'operator', name: 'lockstep-operator' })];
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
        ...tls,
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

/** A ConsistencyGroup `name` of one volume, `data`, on PVC `pvc`. */
export function oneVolumeGroup(name: string, namespace: string, pvc: string): object {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'ConsistencyGroup',
    metadata: { name, namespace },
    spec: { volumes: [{ name: 'data', pvc }] },
  };
}

/** A SyncRelationship `name` of `group` from node `source` to nodes `targets`, `spec` on top. */
export function syncRelationship(
  name: string,
  namespace: string,
  group: string,
  source: string,
  targets: string[],
  spec: object = {},
): { metadata: { name: string; namespace: string }; spec: object } & Record<string, unknown> {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'SyncRelationship',
    metadata: { name, namespace },
    spec: {
      consistencyGroup: group,
      source: { node: source },
      targets: targets.map((node) => ({ node })),
      ...spec,
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

/** KEEP_AGENT_DIRS=1 keeps them, with the agents' and operators' logs, to debug a failure. */
export const removeDir = (dir: string): void => {
  if (!process.env.KEEP_AGENT_DIRS) rmSync(dir, { recursive: true, force: true });
};
