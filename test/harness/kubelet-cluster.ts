// A cluster whose nodes are real (kubelet-node.ts) on a network of their own (node-network.ts):
// the control plane serves on the network's host address, with the controllers and scheduler
// that turn DaemonSets and Deployments into pods, and ServiceAccount tokens mounted into pods
// as in any cluster. There is no kube-proxy: pods reach the apiserver at its address
// (`apiServer`), which charts for such clusters take as a value.
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  WORKLOAD_CONTROLLERS,
  kubectl,
  startControlPlane,
  type ControlPlane,
} from './control-plane';
import { KubeletNode, PAUSE_IMAGE } from './kubelet-node';
import { NodeNetwork } from './node-network';
import { waitFor } from './processes';
import { testTool } from './test-tools';

const execFileAsync = promisify(execFile);

export interface KubeletCluster extends ControlPlane {
  network: NodeNetwork;
  nodes: KubeletNode[];
  /** Where pods reach the apiserver. */
  apiServer: { host: string; port: number };
  node(name: string): KubeletNode;
}

export interface KubeletClusterOptions {
  /** Host directories each node has its own copy of (see KubeletNode). */
  ownPaths: string[];
  /** Images every node has, as OCI archives with the name they get: [archive, repo:tag]. */
  images: Array<[archive: string, name: string]>;
}

export async function startKubeletCluster(
  names: string[],
  opts: KubeletClusterOptions,
): Promise<KubeletCluster> {
  const root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-nodes-'));
  const network = NodeNetwork.create(names);
  const nodes: KubeletNode[] = [];
  let cp: ControlPlane | undefined;
  const stop = async () => {
    for (const node of nodes) await node.stop();
    await cp?.stop();
    network.dispose();
    await execFileAsync('rm', ['-rf', root]);
  };
  try {
    for (const p of opts.ownPaths) mkdirSync(p, { recursive: true });
    cp = await startControlPlane({
      address: network.hostIp,
      serviceAccountTokens: true,
      scheduler: true,
      controllers: [
        ...WORKLOAD_CONTROLLERS,
        // Publishes the cluster's CA into every namespace, for the pods' projected tokens.
        'root-ca-certificate-publisher-controller',
        'persistentvolume-binder',
      ],
    });
    const pause = await pauseImage(root);
    for (const name of names) {
      const dir = path.join(root, name);
      mkdirSync(dir);
      nodes.push(
        await KubeletNode.start(
          { network: network.node(name), dir, kubeconfig: cp.kubeconfig, ownPaths: opts.ownPaths },
          [[pause, PAUSE_IMAGE], ...opts.images],
        ),
      );
    }
    const kubeconfig = cp.kubeconfig;
    await waitFor(
      `nodes ${names.join(', ')} Ready`,
      () => {
        for (const node of nodes) node.assertRunning();
        const ready = kubectl(kubeconfig, [
          'get',
          'nodes',
          '-o',
          'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
        ]);
        return Promise.resolve(names.every((n) => ready.includes(`${n}=True`)) ? true : undefined);
      },
      90_000,
      500,
    );
    const url = new URL(cp.server);
    return {
      ...cp,
      stop,
      network,
      nodes,
      apiServer: { host: url.hostname, port: Number(url.port) },
      node: (name) => {
        const node = nodes.find((n) => n.name === name);
        if (!node) throw new Error(`no node ${name}`);
        return node;
      },
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The sandbox image, from the test tools' pause program: an OCI archive, made with umoci. */
async function pauseImage(root: string): Promise<string> {
  const layout = path.join(root, 'pause-oci');
  const bundle = path.join(root, 'pause-bundle');
  const archive = path.join(root, 'pause.oci.tar');
  const image = `${layout}:${PAUSE_IMAGE.split(':')[1]}`;
  const umoci = (...args: string[]) => execFileAsync('umoci', args);
  await umoci('init', '--layout', layout);
  await umoci('new', '--image', image);
  await umoci('unpack', '--image', image, bundle);
  await execFileAsync('cp', [testTool('pause'), path.join(bundle, 'rootfs', 'pause')]);
  await umoci('repack', '--image', image, bundle);
  await umoci(
    'config',
    '--image',
    image,
    '--config.entrypoint',
    '/pause',
    '--config.user',
    '65535:65535',
  );
  await execFileAsync('tar', ['-C', layout, '-cf', archive, '.']);
  return archive;
}
