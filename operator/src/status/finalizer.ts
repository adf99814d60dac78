// The finalizer protocol of the reconcilers that own something outside Kubernetes (replication
// on the agents, snapshots on every copy): a live object gets the finalizer before anything
// else happens, so its deletion always waits for the teardown; an object being deleted gets
// its teardown, then loses the finalizer.
import type * as k8s from '@kubernetes/client-node';
import { GROUP, VERSION, apiErrorMessage, isNotFound, mergePatch } from '../../../lib/kube';

export interface Finalizable extends k8s.KubernetesObject {
  metadata: k8s.V1ObjectMeta & { name: string };
}

/**
 * The object to reconcile (as the finalizer patch returned it, with the current
 * resourceVersion), or undefined when there is nothing more to do: it was being deleted (and
 * is torn down now), or it is gone.
 */
export async function withFinalizer<T extends Finalizable>(
  objects: k8s.CustomObjectsApi,
  plural: string,
  finalizer: string,
  obj: T,
  teardown: (obj: T) => Promise<void>,
): Promise<T | undefined> {
  const finalizers = obj.metadata.finalizers ?? [];
  if (obj.metadata.deletionTimestamp) {
    if (finalizers.includes(finalizer)) {
      await teardown(obj);
      await setFinalizers(
        objects,
        plural,
        obj,
        finalizers.filter((f) => f !== finalizer),
      );
    }
    return undefined;
  }
  if (finalizers.includes(finalizer)) return obj;
  return setFinalizers(objects, plural, obj, [...finalizers, finalizer]);
}

async function setFinalizers<T extends Finalizable>(
  objects: k8s.CustomObjectsApi,
  plural: string,
  obj: T,
  finalizers: string[],
): Promise<T | undefined> {
  try {
    return (await objects.patchNamespacedCustomObject(
      {
        group: GROUP,
        version: VERSION,
        namespace: obj.metadata.namespace ?? '',
        plural,
        name: obj.metadata.name,
        // The resourceVersion makes this a compare-and-swap: a stale cache gets a conflict.
        body: { metadata: { finalizers, resourceVersion: obj.metadata.resourceVersion } },
      },
      mergePatch,
    )) as T;
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw new Error(`updating finalizers: ${apiErrorMessage(err)}`, { cause: err });
  }
}
