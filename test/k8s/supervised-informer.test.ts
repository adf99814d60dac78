// The supervised informer on a real apiserver, reached through a TCP proxy we can break: it
// delivers adds, updates and deletes, keeps a correct cache, and after a reset connection or a
// silent (half-open) one it restarts and converges on what changed while it was cut off.
import * as k8s from '@kubernetes/client-node';
import pino from 'pino';
import { SupervisedInformer } from '../../operator/src/informers/supervised-informer';
import { ControllerMetrics } from '../../operator/src/metrics';
import { waitFor } from '../harness/processes';
import { TcpProxy } from '../harness/tcp-proxy';

const kubeconfig = process.env.LOCKSTEP_TEST_KUBECONFIG!;
const namespace = `informer-${process.pid}`;
const labels = { app: 'informer-test' };

type Seen = { kind: 'add' | 'update' | 'delete'; name: string; value?: string };

describe('SupervisedInformer', () => {
  const direct = new k8s.KubeConfig();
  let core: k8s.CoreV1Api;
  let proxy: TcpProxy;
  let informer: SupervisedInformer<k8s.V1ConfigMap>;
  const seen: Seen[] = [];
  const metrics = new ControllerMetrics();

  const put = (name: string, value: string) =>
    core.createNamespacedConfigMap({
      namespace,
      body: { metadata: { name, namespace, labels }, data: { value } },
    });
  const change = (name: string, value: string) =>
    core.patchNamespacedConfigMap(
      { name, namespace, body: [{ op: 'replace', path: '/data/value', value }] },
      k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.JsonPatch),
    );
  const remove = (name: string) => core.deleteNamespacedConfigMap({ name, namespace });
  const cached = () =>
    informer
      .list(namespace)
      .map((cm) => `${cm.metadata!.name}=${cm.data?.value}`)
      .sort();
  const converged = (want: string[]) => () =>
    Promise.resolve(JSON.stringify(cached()) === JSON.stringify(want) ? true : undefined);
  const saw = (kind: Seen['kind'], name: string, value?: string) => () =>
    Promise.resolve(
      seen.some(
        (s) => s.kind === kind && s.name === name && (value === undefined || s.value === value),
      )
        ? true
        : undefined,
    );

  beforeAll(async () => {
    direct.loadFromFile(kubeconfig);
    core = direct.makeApiClient(k8s.CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: namespace } } });
    const cluster = direct.getCurrentCluster()!;
    proxy = await TcpProxy.start(new URL(cluster.server).host);
    // The same credentials, but every request of the informer goes through the proxy.
    const proxied = new k8s.KubeConfig();
    proxied.loadFromOptions({
      clusters: [{ ...cluster, server: `https://${proxy.address}` }],
      users: direct.users,
      contexts: direct.contexts,
      currentContext: direct.currentContext,
    });
    const proxiedCore = proxied.makeApiClient(k8s.CoreV1Api);
    const labelSelector = 'app=informer-test';
    informer = new SupervisedInformer<k8s.V1ConfigMap>({
      kc: proxied,
      resource: 'configmaps',
      path: `/api/v1/namespaces/${namespace}/configmaps`,
      list: () => proxiedCore.listNamespacedConfigMap({ namespace, labelSelector }),
      labelSelector,
      onChange: (cm, kind) => {
        seen.push({ kind, name: cm.metadata!.name!, value: cm.data?.value });
        if (cm.metadata!.name === 'grumpy') throw new Error('handlers can fail');
      },
      log: pino({ level: process.env.LOCKSTEP_LOG_LEVEL ?? 'silent' }),
      metrics,
      restartBackoffMs: { min: 50, max: 400 },
      resyncIfQuietMs: 1500,
    });
  });

  afterAll(async () => {
    await informer?.stop();
    await proxy?.close();
    await core?.deleteNamespace({ name: namespace }).catch(() => {});
  });

  it('syncs, then delivers adds, updates and deletes, and serves them from its cache', async () => {
    await put('before', '0');
    expect(informer.synced).toBe(false);
    await informer.start();
    expect(informer.synced).toBe(true);
    expect(cached()).toEqual(['before=0']);

    await put('a', '1');
    await put('b', '1');
    await put('grumpy', '1');
    // Not selected by the label selector: never seen.
    await core.createNamespacedConfigMap({
      namespace,
      body: { metadata: { name: 'unlabelled', namespace }, data: { value: '1' } },
    });
    await change('a', '2');
    await remove('b');
    await waitFor('the delete of b', saw('delete', 'b'), 10_000);
    await waitFor('the cache', converged(['a=2', 'before=0', 'grumpy=1']), 10_000);
    expect(seen.filter((s) => s.name === 'a').map((s) => s.kind)).toEqual(['add', 'update']);
    expect(seen.find((s) => s.name === 'unlabelled')).toBeUndefined();
    expect(informer.get('a', namespace)?.data).toEqual({ value: '2' });
    expect(informer.get('b', namespace)).toBeUndefined();
    expect(informer.get('a')).toBeUndefined();
    expect(informer.list().length).toBe(3);
    expect(informer.list('elsewhere')).toEqual([]);
  });

  it('restarts after its connections are reset and refused, and catches up on what it missed', async () => {
    const restartsBefore = informer.restarts;
    proxy.setMode('refuse');
    proxy.dropAll();
    await remove('a');
    await change('before', '1');
    await put('c', '1');
    // It must have noticed, and failed to relist at least once, while the link was down.
    await waitFor(
      'a restart',
      () => Promise.resolve(informer.restarts > restartsBefore ? true : undefined),
      10_000,
      20,
    );
    await new Promise((r) => setTimeout(r, 200));
    expect(cached()).toEqual(['a=2', 'before=0', 'grumpy=1']);
    proxy.setMode('pass');
    await waitFor('the cache', converged(['before=1', 'c=1', 'grumpy=1']), 10_000);
    expect(seen).toEqual(
      expect.arrayContaining([
        { kind: 'delete', name: 'a', value: '2' },
        { kind: 'update', name: 'before', value: '1' },
        { kind: 'add', name: 'c', value: '1' },
      ]),
    );
    const text = await metrics.registry.metrics();
    expect(text).toMatch(
      /lockstep_operator_informer_restarts_total\{resource="configmaps",reason="error"\} [1-9]/,
    );
    expect(text).toMatch(
      /lockstep_operator_informer_events_total\{resource="configmaps",kind="delete"\} [1-9]/,
    );
  });

  it('relists when its watch goes silent (a half-open link), and converges', async () => {
    const restartsBefore = informer.restarts;
    // Let the watch from the previous test settle, so its stream is the one that goes silent.
    await put('d', '1');
    await waitFor('the add of d', saw('add', 'd'), 10_000);
    proxy.setMode('blackhole');
    await change('c', '2');
    await remove('d');
    await put('e', '1');
    await new Promise((r) => setTimeout(r, 300));
    expect(cached()).toEqual(['before=1', 'c=1', 'd=1', 'grumpy=1']);
    proxy.setMode('pass');
    await waitFor('the cache', converged(['before=1', 'c=2', 'e=1', 'grumpy=1']), 10_000);
    expect(informer.restarts).toBeGreaterThan(restartsBefore);
    expect(await metrics.registry.metrics()).toMatch(
      /lockstep_operator_informer_restarts_total\{resource="configmaps",reason="quiet"\} [1-9]/,
    );
    expect(seen).toEqual(
      expect.arrayContaining([
        { kind: 'update', name: 'c', value: '2' },
        { kind: 'delete', name: 'd', value: '1' },
        { kind: 'add', name: 'e', value: '1' },
      ]),
    );
  });

  it('rejects start() of an informer stopped before it synced', async () => {
    const never = new SupervisedInformer<k8s.V1ConfigMap>({
      kc: direct,
      resource: 'configmaps',
      path: `/api/v1/namespaces/${namespace}/configmaps`,
      list: () => new Promise(() => {}),
      onChange: () => {},
      log: pino({ level: 'silent' }),
    });
    const started = never.start();
    await never.stop();
    await expect(started).rejects.toMatchObject({ code: 'LOCKSTEP_ERR_INFORMER_STOPPED' });
  });
});
