// The chart on real nodes: two kubelets (each in a network namespace with its own containerd,
// runc and host directories) run the product's image as the chart says, with no fake anywhere
// between `helm install` and the block device: the operator and the agents are containers,
// the agents register, replicate between pods over the pod network, serve a volume on their
// host-mounted socket, and come back from a SIGKILL through the kubelet.
import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { buildImage, type BuiltImage } from '../harness/container-image';
import { kubectl, podsReady } from '../harness/control-plane';
import { startKubeletCluster, type KubeletCluster } from '../harness/kubelet-cluster';
import { localPv, oneVolumeGroup, pvc, syncRelationship } from '../harness/cluster';
import { waitFor } from '../harness/processes';
import { testTool } from '../harness/test-tools';
import { packageRoot } from '../../lib/package-root';

const execFileAsync = promisify(execFile);
const NS = 'lockstep-system';
const APPS = 'apps';

interface Pod {
  metadata: { name: string };
  spec: { nodeName?: string };
  status: {
    podIP?: string;
    phase?: string;
    conditions?: Array<{ type: string; status: string }>;
    containerStatuses?: Array<{ containerID?: string; restartCount: number; ready: boolean }>;
  };
}

describe('the chart on real nodes: kubelet, containerd and runc run the image', () => {
  let root: string;
  let image: BuiltImage;
  let cluster: KubeletCluster;
  let dataDir: string;
  let socketDir: string;
  let pvDir: string;

  const kc = (...args: string[]) => kubectl(cluster.kubeconfig, args);
  const json = <T>(...args: string[]): T => JSON.parse(kc('get', ...args, '-o', 'json')) as T;
  const pods = (component: string) =>
    json<{ items: Pod[] }>('pods', '-n', NS, '-l', `app.kubernetes.io/component=${component}`)
      .items;
  const agentOn = (node: string) => {
    const pod = pods('agent').find((p) => p.spec.nodeName === node);
    if (!pod) throw new Error(`no agent pod on ${node}`);
    return pod;
  };
  const helm = (...args: string[]) =>
    execFileAsync(testTool('helm'), ['--kubeconfig', cluster.kubeconfig, ...args], {
      maxBuffer: 16 << 20,
    });
  /** A container's first process, as the host sees it: its uid and effective capabilities. */
  const processOf = async (node: string, containerId: string) => {
    const pid = await cluster.node(node).containerPid(containerId.replace(/^containerd:\/\//, ''));
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    return {
      pid,
      uid: Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]),
      capEff: /^CapEff:\s+(\S+)/m.exec(status)?.[1],
    };
  };
  const phaseOf = (name: string) =>
    json<{ status?: { phase?: string } }>('syncrelationship', name, '-n', APPS).status?.phase;
  const volumeUri = `nbd+unix:///${APPS}.db.data?socket=`;

  beforeAll(async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-real-pods-'));
    image = await buildImage(path.join(root, 'image'));
    // The chart's host directories; each node has its own copy of them.
    [dataDir, socketDir, pvDir] = ['data', 'run', 'pvs'].map((d) => path.join(root, 'host', d)) as [
      string,
      string,
      string,
    ];
    cluster = await startKubeletCluster(['node-a', 'node-b'], {
      ownPaths: [dataDir, socketDir, pvDir],
      images: [[image.archive, `lockstep:${image.tag}`]],
    });
  }, 600_000);

  afterAll(async () => {
    await cluster?.stop();
    if (root) rmSync(root, { recursive: true, force: true });
  });

  it('helm install --wait runs the operator and an agent on every node as containers', async () => {
    kc('create', 'namespace', NS);
    const values = path.join(root, 'values.json');
    writeFileSync(
      values,
      JSON.stringify({
        image: { tag: image.tag, pullPolicy: 'Never' },
        kubernetesServiceHost: cluster.apiServer.host,
        kubernetesServicePort: cluster.apiServer.port,
        operator: { replicas: 1 },
        agent: { dataDir, socketDir, volumeHostPaths: [pvDir], peerTimeoutMs: 2000 },
      }),
    );
    await helm(
      'install',
      'lockstep',
      path.join(packageRoot, 'charts', 'lockstep'),
      '-n',
      NS,
      '-f',
      values,
      '--wait',
      '--timeout',
      '3m',
    );
    await podsReady(cluster.kubeconfig, NS);
    const agents = pods('agent');
    expect(agents.map((p) => p.spec.nodeName).sort()).toEqual(['node-a', 'node-b']);
    const [operator] = pods('operator');
    for (const pod of [...agents, operator]) {
      expect(pod.status.phase).toBe('Running');
      expect(pod.status.conditions?.find((c) => c.type === 'Ready')?.status).toBe('True');
      // On the pod network: an address from its node's range.
      const range = cluster.network.node(pod.spec.nodeName!).podCidr.split('.').slice(0, 3);
      expect(pod.status.podIP?.split('.').slice(0, 3)).toEqual(range);
    }
    // Really running, under runc, with the chart's identities: the operator as the image's
    // non-root user, the agent as root with no capabilities at all.
    const op = await processOf(
      operator.spec.nodeName!,
      operator.status.containerStatuses![0].containerID!,
    );
    expect(op.uid).toBe(65532);
    const agent = await processOf(
      'node-a',
      agentOn('node-a').status.containerStatuses![0].containerID!,
    );
    expect(agent.uid).toBe(0);
    expect(agent.capEff).toBe('0000000000000000');
    expect(readFileSync(`/proc/${agent.pid}/cmdline`, 'utf8').split('\0')).toContain('agent');
  }, 240_000);

  it('each agent registers its node at its pod address and serves NBD on the host-mounted socket', async () => {
    await waitFor(
      'both LockstepNodes Ready',
      () => {
        const nodes = json<{
          items: Array<{
            metadata: { name: string };
            spec: { endpoint: string };
            status?: { conditions?: Array<{ type: string; status: string }> };
          }>;
        }>('lockstepnodes', '-n', NS).items;
        const ready = nodes.filter(
          (n) => n.status?.conditions?.find((c) => c.type === 'Ready')?.status === 'True',
        );
        return Promise.resolve(ready.length === 2 ? nodes : undefined);
      },
      60_000,
      500,
    ).then((nodes) => {
      for (const n of nodes)
        expect(n.spec.endpoint).toBe(`${agentOn(n.metadata.name).status.podIP}:7400`);
    });
    for (const node of cluster.nodes)
      expect(existsSync(path.join(node.hostPath(socketDir), 'nbd.sock'))).toBe(true);
    // Its log, through the apiserver and the kubelet, as `kubectl logs` gets it.
    expect(kc('logs', '-n', NS, agentOn('node-a').metadata.name)).toMatch(/"msg"/);
  });

  it('replicates a volume between the two agent pods: InSync, and every write on both copies', async () => {
    kc('create', 'namespace', APPS);
    const pv = path.join(pvDir, 'pv-db');
    mkdirSync(cluster.node('node-a').hostPath(pv), { recursive: true });
    for (const manifest of [
      localPv('pv-db', 'node-a', pv, '64Mi'),
      pvc('db', APPS, 'pv-db', '64Mi'),
      oneVolumeGroup('db', APPS, 'db'),
      syncRelationship('db-sync', APPS, 'db', 'node-a', ['node-b']),
    ])
      kubectl(cluster.kubeconfig, ['apply', '-f', '-'], JSON.stringify(manifest));
    await waitFor(
      'db-sync InSync',
      () => Promise.resolve(phaseOf('db-sync') === 'InSync' || undefined),
      90_000,
      500,
    );

    const socket = path.join(cluster.node('node-a').hostPath(socketDir), 'nbd.sock');
    execFileSync('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x5a 0 4M',
      '-c',
      'write -P 0xa5 60M 1M',
      volumeUri + socket,
    ]);
    expect(identical()).toBe(true);
  }, 180_000);

  it('an agent SIGKILLed in its pod is restarted by the kubelet, and its copy catches up', async () => {
    const before = agentOn('node-b');
    const { pid } = await processOf('node-b', before.status.containerStatuses![0].containerID!);
    process.kill(pid, 'SIGKILL');
    // Written while the replica's agent is down: acknowledged, and tracked for it.
    const socket = path.join(cluster.node('node-a').hostPath(socketDir), 'nbd.sock');
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 8M 8M', volumeUri + socket]);
    await waitFor(
      'the agent restarted and db-sync InSync again',
      () => {
        const pod = agentOn('node-b');
        const restarted = (pod.status.containerStatuses?.[0]?.restartCount ?? 0) >= 1;
        return Promise.resolve(restarted && phaseOf('db-sync') === 'InSync' ? true : undefined);
      },
      120_000,
      500,
    );
    expect(agentOn('node-b').metadata.name).toBe(before.metadata.name);
    expect(identical()).toBe(true);
  }, 180_000);

  it('helm uninstall removes every pod; no container of ours is left running', async () => {
    kc('delete', 'syncrelationship', 'db-sync', '-n', APPS, '--wait');
    await helm('uninstall', 'lockstep', '-n', NS, '--wait', '--timeout', '2m');
    // The pods stop as the chart lets them (SIGTERM, then a grace period to drain) and go.
    await waitFor(
      'every pod and every container gone',
      async () => {
        if (pods('agent').length || pods('operator').length) return undefined;
        for (const node of cluster.nodes)
          if ((await node.runningContainers()).length) return undefined;
        return true;
      },
      90_000,
      500,
    );
  }, 240_000);

  /** The primary's disk and the replica's copy, byte for byte. */
  function identical(): boolean {
    const primary = path.join(cluster.node('node-a').hostPath(pvDir), 'pv-db', 'disk.img');
    const replica = path.join(
      cluster.node('node-b').hostPath(dataDir),
      'volumes',
      `${APPS}.db.data`,
      'data.img',
    );
    return readFileSync(primary).equals(readFileSync(replica));
  }
});
