// The plugin's view of the cluster: the Lockstep objects and the few core ones it reads,
// through the user's kubeconfig (as kubectl does: --kubeconfig, $KUBECONFIG, ~/.kube/config).
import * as k8s from '@kubernetes/client-node';
import type { Command } from 'commander';
import { GROUP, VERSION, loadKubeConfig, mergePatch } from '../../lib/kube';

export type Plural =
  'syncrelationships' | 'consistencygroups' | 'replicatedsnapshots' | 'lockstepnodes';

export class Cluster {
  readonly kc: k8s.KubeConfig;
  readonly core: k8s.CoreV1Api;
  private readonly objects: k8s.CustomObjectsApi;

  constructor(kubeconfig?: string) {
    this.kc = loadKubeConfig(kubeconfig);
    this.core = this.kc.makeApiClient(k8s.CoreV1Api);
    this.objects = this.kc.makeApiClient(k8s.CustomObjectsApi);
  }

  /** The namespace of the kubeconfig's current context, as kubectl defaults to. */
  get contextNamespace(): string {
    const ctx = this.kc.getContextObject(this.kc.getCurrentContext());
    return ctx?.namespace ?? 'default';
  }

  async list<T>(plural: Plural, namespace?: string): Promise<T[]> {
    const res = (
      namespace && plural !== 'lockstepnodes'
        ? await this.objects.listNamespacedCustomObject({
            group: GROUP,
            version: VERSION,
            namespace,
            plural,
          })
        : await this.objects.listClusterCustomObject({ group: GROUP, version: VERSION, plural })
    ) as { items: T[] };
    return res.items;
  }

  async get<T>(plural: Plural, namespace: string, name: string): Promise<T> {
    return (await this.objects.getNamespacedCustomObject({
      group: GROUP,
      version: VERSION,
      namespace,
      plural,
      name,
    })) as T;
  }

  async patch(plural: Plural, namespace: string, name: string, body: object): Promise<void> {
    await this.objects.patchNamespacedCustomObject(
      { group: GROUP, version: VERSION, namespace, plural, name, body },
      mergePatch,
    );
  }

  async create(plural: Plural, namespace: string, body: object): Promise<void> {
    await this.objects.createNamespacedCustomObject({
      group: GROUP,
      version: VERSION,
      namespace,
      plural,
      body,
    });
  }
}

export interface GlobalFlags {
  kubeconfig?: string;
  namespace?: string;
  allNamespaces: boolean;
}

/** The cluster and the namespace a command works in (-n, else the context's). */
export function target(cmd: Command): { cluster: Cluster; namespace: string; all: boolean } {
  const g = cmd.optsWithGlobals<GlobalFlags>();
  const cluster = new Cluster(g.kubeconfig);
  return { cluster, namespace: g.namespace ?? cluster.contextNamespace, all: g.allNamespaces };
}
