// Proves the test control plane is a real Kubernetes API server: structural-schema validation,
// watches, and the Go-built kubectl and helm all work against it.
import { execFileSync } from 'node:child_process';
import * as k8s from '@kubernetes/client-node';
import { kubectl } from '../harness/control-plane';
import { testTool } from '../harness/test-tools';
import { waitFor } from '../harness/processes';

const kubeconfig = process.env.LOCKSTEP_TEST_KUBECONFIG!;
const group = 'proof.lockstep.dev';
const plural = 'widgets';

describe('the test control plane', () => {
  const kc = new k8s.KubeConfig();
  beforeAll(async () => {
    kc.loadFromFile(kubeconfig);
    const apiext = kc.makeApiClient(k8s.ApiextensionsV1Api);
    await apiext.createCustomResourceDefinition({
      body: {
        metadata: { name: `${plural}.${group}` },
        spec: {
          group,
          scope: 'Namespaced',
          names: { plural, singular: 'widget', kind: 'Widget' },
          versions: [
            {
              name: 'v1',
              served: true,
              storage: true,
              schema: {
                openAPIV3Schema: {
                  type: 'object',
                  properties: {
                    spec: {
                      type: 'object',
                      required: ['sizeBytes'],
                      properties: {
                        sizeBytes: { type: 'integer', minimum: 4096 },
                        mode: { type: 'string', _enum: ['Sync', 'Async'] },
                      },
                    },
                  },
                },
              },
            },
          ],
        },
      },
    });
    await waitFor(
      'CRD Established',
      async () => {
        const crd = await apiext.readCustomResourceDefinition({ name: `${plural}.${group}` });
        return (
          crd.status?.conditions?.some((c) => c.type === 'Established' && c.status === 'True') ||
          undefined
        );
      },
      30_000,
    );
  });

  it('rejects an invalid object with the schema validation message', async () => {
    const api = kc.makeApiClient(k8s.CustomObjectsApi);
    const err = await api
      .createNamespacedCustomObject({
        group,
        version: 'v1',
        namespace: 'default',
        plural,
        body: {
          apiVersion: `${group}/v1`,
          kind: 'Widget',
          metadata: { name: 'bad' },
          spec: { sizeBytes: 1, mode: 'Sometimes' },
        },
      })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(err).toBeInstanceOf(k8s.ApiException);
    const apiErr = err as k8s.ApiException<string>;
    expect(apiErr.code).toBe(422);
    const status = JSON.parse(apiErr.body) as {
      reason: string;
      details: { causes: { field: string; message: string }[] };
    };
    expect(status.reason).toBe('Invalid');
    const causes = Object.fromEntries(status.details.causes.map((c) => [c.field, c.message]));
    expect(causes['spec.sizeBytes']).toContain('should be greater than or equal to 4096');
    expect(causes['spec.mode']).toContain('Unsupported value: "Sometimes"');
  });

  it('delivers a created object through a watch, and kubectl sees it', async () => {
    const seen = new Promise<{ phase: string; name: string }>((resolve, reject) => {
      void new k8s.Watch(kc)
        .watch(
          `/apis/${group}/v1/namespaces/default/${plural}`,
          {},
          (phase: string, obj: k8s.KubernetesObject) => {
            if (obj.metadata?.name === 'good') resolve({ phase, name: obj.metadata.name });
          },
          (err: unknown) => {
            if (err) reject(err instanceof Error ? err : new Error('watch ended with an error'));
          },
        )
        .then((req) => seen.finally(() => req.abort()), reject);
    });
    // The watch is open before the create, so the object arrives as ADDED.
    await new Promise((r) => setTimeout(r, 300));
    await kc.makeApiClient(k8s.CustomObjectsApi).createNamespacedCustomObject({
      group,
      version: 'v1',
      namespace: 'default',
      plural,
      body: {
        apiVersion: `${group}/v1`,
        kind: 'Widget',
        metadata: { name: 'good' },
        spec: { sizeBytes: 65536, mode: 'Sync' },
      },
    });
    await expect(seen).resolves.toEqual({ phase: 'ADDED', name: 'good' });

    const listed = JSON.parse(kubectl(kubeconfig, ['get', `${plural}.${group}`, '-o', 'json'])) as {
      items: { metadata: { name: string }; spec: { sizeBytes: number } }[];
    };
    expect(listed.items.map((i) => [i.metadata.name, i.spec.sizeBytes])).toEqual([['good', 65536]]);
  });

  it('reports its real version to kubectl, and helm talks to it', () => {
    const version = JSON.parse(kubectl(kubeconfig, ['version', '-o', 'json'])) as {
      clientVersion: { gitVersion: string };
      serverVersion: { gitVersion: string };
    };
    expect(version.serverVersion.gitVersion).toMatch(/^v1\.34\.\d+$/);
    expect(version.clientVersion.gitVersion).toBe(version.serverVersion.gitVersion);

    const helm = testTool('helm');
    expect(execFileSync(helm, ['version', '--short'], { encoding: 'utf8' })).toMatch(
      /^v3\.\d+\.\d+/,
    );
    const releases = execFileSync(
      helm,
      ['list', '--all-namespaces', '-o', 'json', `--kubeconfig=${kubeconfig}`],
      {
        encoding: 'utf8',
      },
    );
    expect(JSON.parse(releases)).toEqual([]);
  });

  it('refuses an unauthenticated client', async () => {
    const anon = new k8s.KubeConfig();
    anon.loadFromFile(kubeconfig);
    anon.users[0] = { name: anon.users[0].name, token: 'not-a-valid-token' };
    const err = await anon
      .makeApiClient(k8s.CoreV1Api)
      .listNamespace()
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect((err as k8s.ApiException<unknown>).code).toBe(401);
  });
});
