// The status writer every reconciler shares: it writes through the status subresource only
// when the status changed, to the endpoint of the object's scope, and treats an object deleted
// meanwhile as nothing to do.
import { ApiException, type CustomObjectsApi } from '@kubernetes/client-node';
import type { Condition, LockstepNode } from '../../operator/src/api/types';
import { writeStatusIfChanged } from '../../operator/src/status/status-writer';
import { syncRelationship } from './relationship-fixture';

type Call = { scope: 'namespaced' | 'cluster'; request: Record<string, unknown> };

function fakeApi(fail?: number): { api: CustomObjectsApi; calls: Call[] } {
  const calls: Call[] = [];
  const answer = (scope: Call['scope'], request: Record<string, unknown>) => {
    calls.push({ scope, request });
    return fail ? Promise.reject(new ApiException(fail, 'refused', '{}', {})) : Promise.resolve({});
  };
  const api = {
    replaceNamespacedCustomObjectStatus: (r: Record<string, unknown>) => answer('namespaced', r),
    replaceClusterCustomObjectStatus: (r: Record<string, unknown>) => answer('cluster', r),
  } as unknown as CustomObjectsApi;
  return { api, calls };
}

const ready: Condition = {
  type: 'Ready',
  status: 'True',
  observedGeneration: 1,
  lastTransitionTime: '2026-01-01T00:00:00.000Z',
  reason: 'Replicating',
  message: 'replicating 1 volume(s) from a to b',
};

const rel = syncRelationship(
  { resourceVersion: '7' },
  { phase: 'InSync', dirtyBytes: 0, conditions: [ready] },
);

describe('writing status only when it changed', () => {
  it('writes nothing when the status is the same JSON, whatever its key order', async () => {
    const { api, calls } = fakeApi();
    const same = { conditions: [{ ...ready }], dirtyBytes: 0, phase: 'InSync' as const };
    expect(await writeStatusIfChanged(api, 'syncrelationships', rel, same)).toBe(false);
    expect(calls).toEqual([]);
  });

  it('replaces a namespaced object’s status, conditioned on the cached resourceVersion', async () => {
    const { api, calls } = fakeApi();
    const status = { ...rel.status, phase: 'Degraded' as const };
    expect(await writeStatusIfChanged(api, 'syncrelationships', rel, status)).toBe(true);
    expect(calls.map((c) => c.scope)).toEqual(['namespaced']);
    expect(calls[0]?.request).toMatchObject({
      plural: 'syncrelationships',
      namespace: 'ns',
      name: 'r',
      body: { metadata: { resourceVersion: '7' }, status },
    });
  });

  it('writes a first status of a cluster-scoped object through the cluster endpoint', async () => {
    const { api, calls } = fakeApi();
    const node: LockstepNode = {
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'LockstepNode',
      metadata: { name: 'n1' },
      spec: { endpoint: 'n1:7400' },
    };
    expect(await writeStatusIfChanged(api, 'lockstepnodes', node, { conditions: [ready] })).toBe(
      true,
    );
    expect(calls.map((c) => [c.scope, c.request.name, c.request.namespace])).toEqual([
      ['cluster', 'n1', undefined],
    ]);
  });

  it('reports no write for an object deleted meanwhile, and fails on a stale cache', async () => {
    const changed = { ...rel.status, dirtyBytes: 4096 };
    expect(await writeStatusIfChanged(fakeApi(404).api, 'syncrelationships', rel, changed)).toBe(
      false,
    );
    await expect(
      writeStatusIfChanged(fakeApi(409).api, 'syncrelationships', rel, changed),
    ).rejects.toThrow('status conflict: syncrelationships/r changed meanwhile');
  });
});
