// A real Kubernetes control plane for tests: etcd and kube-apiserver (and, on request,
// kube-controller-manager) on free loopback ports, configured the way envtest configures them:
// a static admin token in system:masters, RBAC authorization, service-account signing keys.
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { freePort, startProcess, waitFor, type ManagedProcess } from './processes';
import { testTool } from './test-tools';

export interface ControlPlaneInfo {
  dir: string;
  server: string;
  token: string;
  caFile: string;
  kubeconfig: string;
}

export interface ControlPlane extends ControlPlaneInfo {
  processes: ManagedProcess[];
  stop(): Promise<void>;
}

/**
 * The controllers that turn Deployments and DaemonSets into pods and clean up after them, give
 * namespaces their ServiceAccounts, and lift the not-ready taint the apiserver puts on a new
 * node once its kubelet (or kwok) reports it Ready.
 */
export const WORKLOAD_CONTROLLERS = [
  'deployment',
  'replicaset',
  'daemonset',
  'garbagecollector',
  'serviceaccount',
  'namespace',
  'nodelifecycle',
];

export interface ControlPlaneOptions {
  /** Controllers for kube-controller-manager (e.g. ['persistentvolume-binder']); none → not started. */
  controllers?: string[];
  /** Runs kube-scheduler, for pods made by controllers (DaemonSets, Deployments). */
  scheduler?: boolean;
  /**
   * The address the apiserver serves on and advertises, for kubelets and pods in network
   * namespaces of their own (a test network's host address); loopback when unset.
   */
  address?: string;
  /**
   * Pods get their ServiceAccount's token mounted (the ServiceAccount admission plugin), as a
   * real cluster does; off unless pods really run, so tests can make pods without accounts.
   */
  serviceAccountTokens?: boolean;
  keepDir?: boolean;
}

function get(url: string, token: string, ca?: Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.get(
      url,
      {
        headers: { Authorization: `Bearer ${token}` },
        ca,
        rejectUnauthorized: ca !== undefined,
        timeout: 2000,
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('timeout', () => req.destroy(new Error('request timed out')));
    req.on('error', reject);
  });
}

export function writeKubeconfig(
  file: string,
  server: string,
  caFile: string,
  token: string,
  user = 'admin',
): void {
  const ca = readFileSync(caFile).toString('base64');
  writeFileSync(
    file,
    [
      'apiVersion: v1',
      'kind: Config',
      'clusters:',
      '- name: test',
      '  cluster:',
      `    server: ${server}`,
      `    certificate-authority-data: ${ca}`,
      'users:',
      `- name: ${user}`,
      '  user:',
      `    token: ${token}`,
      'contexts:',
      '- name: test',
      '  context:',
      '    cluster: test',
      `    user: ${user}`,
      'current-context: test',
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
}

export async function startControlPlane(opts: ControlPlaneOptions = {}): Promise<ControlPlane> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-cp-'));
  const processes: ManagedProcess[] = [];
  const stop = async () => {
    for (const p of [...processes].reverse()) await p.stop();
    if (!opts.keepDir) rmSync(dir, { recursive: true, force: true });
  };
  try {
    const [etcdClient, etcdPeer, apiPort] = [await freePort(), await freePort(), await freePort()];
    const address = opts.address ?? '127.0.0.1';
    const etcdUrl = `http://127.0.0.1:${etcdClient}`;
    const etcd = startProcess(
      'etcd',
      testTool('etcd'),
      [
        `--data-dir=${path.join(dir, 'etcd')}`,
        `--listen-client-urls=${etcdUrl}`,
        `--advertise-client-urls=${etcdUrl}`,
        `--listen-peer-urls=http://127.0.0.1:${etcdPeer}`,
        `--initial-advertise-peer-urls=http://127.0.0.1:${etcdPeer}`,
        `--initial-cluster=default=http://127.0.0.1:${etcdPeer}`,
        '--unsafe-no-fsync',
        '--log-level=warn',
      ],
      path.join(dir, 'etcd.log'),
    );
    processes.push(etcd);

    const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const saPub = path.join(dir, 'sa.pub');
    const saKey = path.join(dir, 'sa.key');
    writeFileSync(saPub, publicKey.export({ type: 'spki', format: 'pem' }));
    writeFileSync(saKey, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    const token = randomBytes(24).toString('hex');
    writeFileSync(path.join(dir, 'tokens.csv'), `${token},admin,admin-uid,"system:masters"\n`, {
      mode: 0o600,
    });
    const certDir = path.join(dir, 'certs');

    const apiserver = startProcess(
      'kube-apiserver',
      testTool('kube-apiserver'),
      [
        `--etcd-servers=${etcdUrl}`,
        `--bind-address=${address}`,
        `--advertise-address=${address}`,
        `--secure-port=${apiPort}`,
        `--cert-dir=${certDir}`,
        `--token-auth-file=${path.join(dir, 'tokens.csv')}`,
        '--authorization-mode=RBAC',
        `--service-account-key-file=${saPub}`,
        `--service-account-signing-key-file=${saKey}`,
        '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
        '--service-cluster-ip-range=10.0.0.0/24',
        '--allow-privileged=true',
        // Logs and exec reach a kubelet at its node's address (test nodes have no DNS names).
        '--kubelet-preferred-address-types=InternalIP,Hostname',
        ...(opts.serviceAccountTokens ? [] : ['--disable-admission-plugins=ServiceAccount']),
        '--audit-log-path=' + path.join(dir, 'audit.log'),
        '--audit-policy-file=' + writeAuditPolicy(dir),
        '--v=0',
      ],
      path.join(dir, 'kube-apiserver.log'),
    );
    processes.push(apiserver);

    const server = `https://${address}:${apiPort}`;
    const caFile = path.join(certDir, 'apiserver.crt');
    await waitFor(
      'kube-apiserver /readyz',
      async () => {
        for (const p of processes)
          if (p.child.exitCode !== null)
            throw new Error(`${p.name} exited:\n${p.log().slice(-2000)}`);
        if (!existsSync(caFile)) return undefined;
        const res = await get(`${server}/readyz`, token, readFileSync(caFile));
        return res.status === 200 ? true : undefined;
      },
      120_000,
      200,
    );

    const kubeconfig = path.join(dir, 'kubeconfig');
    writeKubeconfig(kubeconfig, server, caFile, token);

    if (opts.controllers?.length) {
      processes.push(
        startProcess(
          'kube-controller-manager',
          testTool('kube-controller-manager'),
          [
            `--kubeconfig=${kubeconfig}`,
            `--controllers=${opts.controllers.join(',')}`,
            `--service-account-private-key-file=${saKey}`,
            `--root-ca-file=${caFile}`,
            '--leader-elect=false',
            '--secure-port=0',
            '--v=1',
          ],
          path.join(dir, 'kube-controller-manager.log'),
        ),
      );
    }
    if (opts.scheduler) {
      processes.push(
        startProcess(
          'kube-scheduler',
          testTool('kube-scheduler'),
          [
            `--kubeconfig=${kubeconfig}`,
            `--authentication-kubeconfig=${kubeconfig}`,
            `--authorization-kubeconfig=${kubeconfig}`,
            '--leader-elect=false',
            '--bind-address=127.0.0.1',
            `--secure-port=${await freePort()}`,
            '--v=1',
          ],
          path.join(dir, 'kube-scheduler.log'),
        ),
      );
    }
    return { dir, server, token, caFile, kubeconfig, processes, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

function writeAuditPolicy(dir: string): string {
  // Metadata for every request: tests count who wrote what (e.g. "zero writes at rest").
  const file = path.join(dir, 'audit-policy.yaml');
  writeFileSync(file, 'apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n');
  return file;
}

/** Runs the Go-built kubectl against a kubeconfig and returns its stdout. */
export function kubectl(kubeconfig: string, args: string[], input?: string): string {
  return execFileSync(testTool('kubectl'), [`--kubeconfig=${kubeconfig}`, ...args], {
    encoding: 'utf8',
    input,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
}

/**
 * Waits until `namespace` has pods and every one is Ready. `helm install --wait` alone is not
 * that: it counts a DaemonSet ready with `maxUnavailable` of its pods still not ready.
 */
export async function podsReady(
  kubeconfig: string,
  namespace: string,
  timeoutMs = 60_000,
): Promise<void> {
  await waitFor(
    `every pod in ${namespace} Ready`,
    () => {
      const ready = kubectl(kubeconfig, [
        'get',
        'pods',
        '-n',
        namespace,
        '-o',
        'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
      ])
        .split('\n')
        .filter(Boolean);
      return Promise.resolve(ready.length && ready.every((s) => s === 'True') ? true : undefined);
    },
    timeoutMs,
    250,
  );
}
