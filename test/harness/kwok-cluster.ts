// A cluster whose nodes are kwok's: a real control plane with the controllers that turn
// Deployments and DaemonSets into pods, collect them and mark nodes ready, the real
// kube-scheduler placing those pods, and kwok playing the kubelet of each node (it marks pods
// Running and Ready without running them). What `helm install` needs to be tested for real, on
// one machine.
import path from 'node:path';
import {
  WORKLOAD_CONTROLLERS,
  kubectl,
  startControlPlane,
  type ControlPlane,
} from './control-plane';
import { freePort, startProcess, waitFor } from './processes';
import { testTool } from './test-tools';

const KWOK_ANNOTATION = 'kwok.x-k8s.io/node';

export interface KwokCluster extends ControlPlane {
  nodes: string[];
}

export async function startKwokCluster(nodes: string[]): Promise<KwokCluster> {
  const cp = await startControlPlane({
    controllers: WORKLOAD_CONTROLLERS,
    scheduler: true,
  });
  try {
    cp.processes.push(
      startProcess(
        'kwok',
        testTool('kwok'),
        [
          `--kubeconfig=${cp.kubeconfig}`,
          '--manage-all-nodes=false',
          `--manage-nodes-with-annotation-selector=${KWOK_ANNOTATION}=fake`,
          '--cidr=10.244.0.0/16',
          '--node-ip=10.0.0.1',
          `--server-address=127.0.0.1:${await freePort()}`,
        ],
        path.join(cp.dir, 'kwok.log'),
      ),
    );
    kubectl(cp.kubeconfig, ['apply', '-f', '-'], JSON.stringify(nodeList(nodes)));
    await waitFor(
      `kwok nodes ${nodes.join(', ')} Ready`,
      () => {
        const ready = kubectl(cp.kubeconfig, [
          'get',
          'nodes',
          '-o',
          'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
        ]);
        return Promise.resolve(nodes.every((n) => ready.includes(`${n}=True`)) ? true : undefined);
      },
      60_000,
      250,
    );
    return { ...cp, nodes };
  } catch (err) {
    await cp.stop();
    throw err;
  }
}

function nodeList(nodes: string[]): object {
  return {
    apiVersion: 'v1',
    kind: 'List',
    items: nodes.map((name) => ({
      apiVersion: 'v1',
      kind: 'Node',
      metadata: {
        name,
        annotations: { [KWOK_ANNOTATION]: 'fake', 'node.alpha.kubernetes.io/ttl': '0' },
        labels: {
          'kubernetes.io/hostname': name,
          'kubernetes.io/os': 'linux',
          'kubernetes.io/arch': 'amd64',
          type: 'kwok',
        },
      },
      status: {
        allocatable: { cpu: '8', memory: '32Gi', pods: '110' },
        capacity: { cpu: '8', memory: '32Gi', pods: '110' },
      },
    })),
  };
}
