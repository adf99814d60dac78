// The one way the reconcilers write status: through the status subresource, and only when the
// new status differs from the stored one, so an object at rest costs no API writes. Conditions
// arrive already merged (mergeConditions), so an unchanged condition compares equal.
import type * as k8s from '@kubernetes/client-node';
import { GROUP, VERSION, apiErrorMessage, isConflict, isNotFound } from '../../../lib/kube';
import { sameJson } from './conditions';

export interface WithStatus<S> extends k8s.KubernetesObject {
  metadata: k8s.V1ObjectMeta & { name: string };
  status?: S;
}

/**
 * Replaces the status of `object` (as the informer cached it) with `status` if they differ.
 * Returns whether it wrote; an object deleted meanwhile is not an error, its deletion is an
 * event of its own. Objects without a namespace are of a cluster-scoped kind.
 */
export async function writeStatusIfChanged<S extends object>(
  objects: k8s.CustomObjectsApi,
  plural: string,
  object: WithStatus<S>,
  status: S,
): Promise<boolean> {
  if (sameJson(object.status ?? {}, status)) return false;
  const { name, namespace } = object.metadata;
  const request = { group: GROUP, version: VERSION, plural, name, body: { ...object, status } };
  try {
    if (namespace) await objects.replaceNamespacedCustomObjectStatus({ ...request, namespace });
    else await objects.replaceClusterCustomObjectStatus(request);
  } catch (err) {
    if (isNotFound(err)) return false;
    // The body carries the cached resourceVersion, so a stale cache gets a conflict: the
    // change that made it stale enqueues the object again, and the retry sees it.
    if (isConflict(err)) throw new Error(`status conflict: ${plural}/${name} changed meanwhile`);
    throw new Error(`writing ${plural}/${name} status: ${apiErrorMessage(err)}`, { cause: err });
  }
  return true;
}
