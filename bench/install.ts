// What installing and running Lockstep costs: the image's compressed size, `lockstep --version`
// run from the image's root filesystem, an agent's memory at rest with 10 volumes, and
// `helm install --wait` until every pod is Ready on three kwok nodes. Absolute targets (issue
// 15): image ≤ 80 MiB, --version ≤ 150 ms, RSS ≤ 100 MiB, install ≤ 60 s.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../lib/package-root';
import { AgentProcess } from '../test/harness/agent-process';
import { buildImage } from '../test/harness/container-image';
import { kubectl, podsReady } from '../test/harness/control-plane';
import { startKwokCluster } from '../test/harness/kwok-cluster';
import { testTool } from '../test/harness/test-tools';
import { median } from './fio-jobs';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;

export interface InstallResult {
  imageMiB: number;
  versionMs: number;
  /** A standalone agent. */
  agentRssMiB: number;
  /** An agent as the chart runs it: registered with the cluster (the Kubernetes client loaded). */
  registeredAgentRssMiB: number;
  helmInstallSeconds: number;
}

async function imageFigures(): Promise<{ imageMiB: number; versionMs: number }> {
  const work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-image-'));
  try {
    const image = await buildImage(path.join(work, 'out'));
    const rootfs = path.join(work, 'bundle');
    await execFileAsync('umoci', ['unpack', '--image', `${image.layout}:${image.tag}`, rootfs]);
    const times: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t = performance.now();
      await execFileAsync('chroot', [
        '--userspec=65532:65532',
        path.join(rootfs, 'rootfs'),
        '/usr/local/bin/node',
        '/opt/lockstep/bin/lockstep.js',
        '--version',
      ]);
      times.push(performance.now() - t);
    }
    return { imageMiB: statSync(image.archive).size / MiB, versionMs: median(times) };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

async function agentRss(kubeconfig?: string): Promise<number> {
  const register = kubeconfig
    ? ['--register', '--kubeconfig', kubeconfig, '--namespace', 'lockstep-system']
    : [];
  const agent = await new AgentProcess({
    node: 'bench-rss',
    metrics: true,
    extraArgs: register,
  }).start();
  try {
    for (let i = 0; i < 10; i++) await agent.createVolume(`v${i}`, '1GiB');
    // At rest: what it keeps, once start-up garbage has had a chance to go.
    await new Promise((r) => setTimeout(r, 10_000));
    const status = readFileSync(`/proc/${agent.proc.child.pid}/status`, 'utf8');
    return Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1] ?? NaN) / 1024;
  } finally {
    await agent.dispose();
  }
}

/** Installs the chart; then measures a registered agent's RSS on that cluster. */
async function helmInstall(): Promise<{ seconds: number; registeredRssMiB: number }> {
  const cluster = await startKwokCluster(['kwok-a', 'kwok-b', 'kwok-c']);
  const home = mkdtempSync(path.join(os.tmpdir(), 'lockstep-bench-helm-'));
  try {
    kubectl(cluster.kubeconfig, ['create', 'namespace', 'lockstep-system']);
    const t = performance.now();
    await execFileAsync(
      testTool('helm'),
      [
        '--kubeconfig',
        cluster.kubeconfig,
        'install',
        'lockstep',
        path.join(packageRoot, 'charts', 'lockstep'),
        '--namespace',
        'lockstep-system',
        '--wait',
        '--timeout',
        '5m',
      ],
      {
        env: {
          ...process.env,
          HELM_CACHE_HOME: home,
          HELM_CONFIG_HOME: home,
          HELM_DATA_HOME: home,
        },
      },
    );
    await podsReady(cluster.kubeconfig, 'lockstep-system', 300_000);
    const seconds = (performance.now() - t) / 1000;
    return { seconds, registeredRssMiB: await agentRss(cluster.kubeconfig) };
  } finally {
    await cluster.stop();
    rmSync(home, { recursive: true, force: true });
  }
}

export async function installRun(): Promise<InstallResult> {
  const image = await imageFigures();
  const agentRssMiB = await agentRss();
  const helm = await helmInstall();
  return {
    ...image,
    agentRssMiB,
    registeredAgentRssMiB: helm.registeredRssMiB,
    helmInstallSeconds: helm.seconds,
  };
}

export function installReport(r: InstallResult): string {
  return (
    `install image_mib=${r.imageMiB.toFixed(1)} version_in_image_ms=${r.versionMs.toFixed(0)} ` +
    `agent_rss_10_volumes_mib=${r.agentRssMiB.toFixed(1)} ` +
    `registered_agent_rss_10_volumes_mib=${r.registeredAgentRssMiB.toFixed(1)} ` +
    `helm_install_3_kwok_nodes_s=${r.helmInstallSeconds.toFixed(1)}`
  );
}
