// The Helm chart as a platform team meets it, with the real helm and kubectl: linted strictly,
// rendered over a matrix of values (bad values refused with a message that names them),
// accepted by a real API server, and installed onto three kwok nodes — every DaemonSet and
// Deployment pod scheduled and Ready — then upgraded and uninstalled, the CRDs kept.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import yaml from 'js-yaml';
import { packageRoot, packageVersion } from '../../lib/package-root';
import { kubectl, podsReady } from '../harness/control-plane';
import { startKwokCluster, type KwokCluster } from '../harness/kwok-cluster';
import { testTool } from '../harness/test-tools';

const execFileAsync = promisify(execFile);
const chart = path.join(packageRoot, 'charts', 'lockstep');
const NS = 'lockstep-system';

interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; annotations?: Record<string, string> };
  rules?: unknown;
  roleRef?: unknown;
  subjects?: { kind: string; name: string }[];
  spec?: Record<string, unknown>;
}

// helm's own cache and config, kept out of the user's home.
const helmHome = mkdtempSync(path.join(os.tmpdir(), 'lockstep-helm-'));
afterAll(() => rmSync(helmHome, { recursive: true, force: true }));
const helmEnv = {
  ...process.env,
  HELM_CACHE_HOME: path.join(helmHome, 'cache'),
  HELM_CONFIG_HOME: path.join(helmHome, 'config'),
  HELM_DATA_HOME: path.join(helmHome, 'data'),
};

async function helm(args: string[], kubeconfig?: string): Promise<string> {
  try {
    const { stdout } = await execFileAsync(
      testTool('helm'),
      [...(kubeconfig ? ['--kubeconfig', kubeconfig] : []), ...args],
      { maxBuffer: 32 << 20, timeout: 300_000, env: helmEnv },
    );
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string };
    throw new Error(`helm ${args.join(' ')} failed:\n${e.stderr ?? ''}${e.stdout ?? ''}`);
  }
}

/** `helm template` with --set values (and --api-versions), parsed. */
async function render(set: string[] = [], apis: string[] = []): Promise<K8sObject[]> {
  const out = await helm([
    'template',
    'lockstep',
    chart,
    '--namespace',
    NS,
    ...set.flatMap((s) => ['--set', s]),
    ...apis.flatMap((a) => ['--api-versions', a]),
  ]);
  return (yaml.loadAll(out) as (K8sObject | null)[]).filter((o): o is K8sObject => !!o);
}

const names = (objs: K8sObject[]) => objs.map((o) => `${o.kind}/${o.metadata.name}`).sort();
const find = (objs: K8sObject[], kind: string, name: string) =>
  objs.find((o) => o.kind === kind && o.metadata.name === name);

interface PodSpecLike {
  template: { spec: { containers: { args: string[] }[]; volumes?: { name: string }[] } };
}
const argsOf = (o: K8sObject | undefined) =>
  (o?.spec as unknown as PodSpecLike | undefined)?.template.spec.containers[0].args ?? [];

describe('the Helm chart', () => {
  it('is the product’s version, and carries the CRDs of deploy/crds, kept on uninstall', async () => {
    const meta = yaml.load(readFileSync(path.join(chart, 'Chart.yaml'), 'utf8')) as {
      version: string;
      appVersion: string;
    };
    expect(meta).toMatchObject({ version: packageVersion, appVersion: packageVersion });
    const crds = (await render()).filter((o) => o.kind === 'CustomResourceDefinition');
    const deployed = readdirSync(path.join(packageRoot, 'deploy', 'crds')).map(
      (f) =>
        yaml.load(readFileSync(path.join(packageRoot, 'deploy', 'crds', f), 'utf8')) as K8sObject,
    );
    expect(crds.map((c) => c.metadata.name).sort()).toEqual(
      deployed.map((c) => c.metadata.name).sort(),
    );
    for (const crd of crds) {
      expect(crd.metadata.annotations).toEqual({ 'helm.sh/resource-policy': 'keep' });
      expect(crd.spec).toEqual(deployed.find((d) => d.metadata.name === crd.metadata.name)?.spec);
    }
  });

  it('passes helm lint --strict, with and without the optional parts', async () => {
    await helm(['lint', '--strict', chart]);
    await helm(['lint', '--strict', chart, '--set', 'mediator.enabled=true,crds.install=false']);
  });

  it('grants exactly the RBAC of deploy/rbac', async () => {
    const rendered = await render(['mediator.enabled=true']);
    for (const file of ['operator.yaml', 'agent.yaml', 'mediator.yaml']) {
      const deployed = yaml.loadAll(
        readFileSync(path.join(packageRoot, 'deploy', 'rbac', file), 'utf8'),
      ) as K8sObject[];
      for (const want of deployed) {
        const got = find(rendered, want.kind, want.metadata.name);
        expect(got).toBeDefined();
        expect(got?.metadata.namespace).toBe(want.metadata.namespace);
        expect(got?.rules).toEqual(want.rules);
        expect(got?.roleRef).toEqual(want.roleRef);
        expect(got?.subjects).toEqual(want.subjects);
      }
      const kinds = ['ServiceAccount', 'ClusterRole', 'ClusterRoleBinding', 'Role', 'RoleBinding'];
      const component = file.replace('.yaml', '');
      expect(
        names(
          rendered.filter(
            (o) => kinds.includes(o.kind) && o.metadata.name === `lockstep-${component}`,
          ),
        ),
      ).toEqual(names(deployed));
    }
  });

  it('renders each TLS mode, the mediator, pinned images and the monitors only where their API is served', async () => {
    const base = await render();
    expect(names(base)).toEqual(
      expect.arrayContaining([
        'DaemonSet/lockstep-agent',
        'Deployment/lockstep-operator',
        'Service/lockstep-operator-metrics',
      ]),
    );
    expect(names(base).filter((n) => /mediator|Monitor|Certificate|Issuer/.test(n))).toEqual([]);
    const dashboard = find(base, 'ConfigMap', 'lockstep-dashboard') as
      | (K8sObject & { metadata: { labels: Record<string, string> }; data: Record<string, string> })
      | undefined;
    expect(dashboard?.metadata.labels.grafana_dashboard).toBe('1');
    expect(JSON.parse(dashboard?.data['lockstep.json'] ?? '{}')).toEqual(
      JSON.parse(readFileSync(path.join(chart, 'files', 'dashboard.json'), 'utf8')),
    );
    expect(names(await render(['monitoring.dashboard=false']))).not.toContain(
      'ConfigMap/lockstep-dashboard',
    );
    const operator = argsOf(find(base, 'Deployment', 'lockstep-operator'));
    expect(operator).toEqual(
      expect.arrayContaining([
        '--manage-certificates',
        '--ca-secret=lockstep-ca',
        `--namespace=${NS}`,
      ]),
    );
    expect(operator).not.toContain('--no-create-ca');
    expect(argsOf(find(base, 'DaemonSet', 'lockstep-agent'))).toEqual(
      expect.arrayContaining(['--request-certificate', '--register', '--node=$(NODE_NAME)']),
    );

    const own = await render(['tls.mode=existingSecret', 'tls.caSecret=my-ca']);
    expect(argsOf(find(own, 'Deployment', 'lockstep-operator'))).toEqual(
      expect.arrayContaining(['--ca-secret=my-ca', '--no-create-ca']),
    );

    const cm = await render(['tls.mode=certManager'], ['cert-manager.io/v1/Certificate']);
    expect(find(cm, 'Certificate', 'lockstep-ca')?.spec).toMatchObject({
      isCA: true,
      secretName: 'lockstep-ca',
    });
    expect(argsOf(find(cm, 'Deployment', 'lockstep-operator'))).toContain('--no-create-ca');

    const monitored = await render(
      ['monitoring.labels.release=prom'],
      [
        'monitoring.coreos.com/v1/ServiceMonitor',
        'monitoring.coreos.com/v1/PodMonitor',
        'monitoring.coreos.com/v1/PrometheusRule',
      ],
    );
    const alerts = yaml.load(readFileSync(path.join(chart, 'files', 'alerts.yaml'), 'utf8')) as {
      groups: unknown[];
    };
    expect(find(monitored, 'PrometheusRule', 'lockstep')?.spec).toEqual({ groups: alerts.groups });
    expect(find(monitored, 'PodMonitor', 'lockstep-agent')?.metadata).toMatchObject({
      labels: expect.objectContaining({ release: 'prom' }) as unknown,
    });
    expect(find(monitored, 'ServiceMonitor', 'lockstep-operator')).toBeDefined();

    const mediator = await render(['mediator.enabled=true']);
    expect(names(mediator)).toEqual(
      expect.arrayContaining([
        'Deployment/lockstep-mediator',
        'PersistentVolumeClaim/lockstep-mediator',
        'Service/lockstep-mediator',
      ]),
    );
    const ephemeral = await render(['mediator.enabled=true', 'mediator.persistence.enabled=false']);
    expect(names(ephemeral)).not.toContain('PersistentVolumeClaim/lockstep-mediator');

    const digest = `sha256:${'ab'.repeat(32)}`;
    const pinned = await render([
      `image.digest=${digest}`,
      'image.repository=registry.example/lockstep',
    ]);
    const images = pinned
      .filter((o) => o.kind === 'Deployment' || o.kind === 'DaemonSet')
      .map(
        (o) =>
          (o.spec as { template: { spec: { containers: { image: string }[] } } }).template.spec
            .containers[0].image,
      );
    expect(new Set(images)).toEqual(new Set([`registry.example/lockstep@${digest}`]));

    expect(
      names(await render(['crds.install=false'])).filter((n) => n.startsWith('Custom')),
    ).toEqual([]);

    // Without kube-proxy, every pod is told where the apiserver is; otherwise none is.
    const envOf = (objs: K8sObject[]) =>
      objs
        .filter((o) => o.kind === 'Deployment' || o.kind === 'DaemonSet')
        .map((o) =>
          Object.fromEntries(
            (
              o.spec as {
                template: { spec: { containers: { env?: { name: string; value?: string }[] }[] } };
              }
            ).template.spec.containers[0].env?.map((e) => [e.name, e.value]) ?? [],
          ),
        );
    const direct = envOf(
      await render([
        'mediator.enabled=true',
        'kubernetesServiceHost=10.1.2.3',
        'kubernetesServicePort=6443',
      ]),
    );
    expect(direct).toHaveLength(3);
    for (const env of direct)
      expect(env).toMatchObject({
        KUBERNETES_SERVICE_HOST: '10.1.2.3',
        KUBERNETES_SERVICE_PORT: '6443',
      });
    for (const env of envOf(mediator)) expect(env).not.toHaveProperty('KUBERNETES_SERVICE_HOST');
  });

  it('refuses bad values with a message that names them', async () => {
    const refused = async (set: string[], why: RegExp, apis: string[] = []) =>
      expect(render(set, apis)).rejects.toThrow(why);
    await refused(['tls.mode=vault'], /tls\.mode|\/tls\/mode/);
    await refused(['tls.mode=vault'], /operator.*certManager.*existingSecret/);
    await refused(['agnet.dataDir=/x'], /agnet/);
    await refused(['agent.volumeHostPaths={relative/dir}'], /volumeHostPaths/);
    await refused(['operator.replicas=0'], /replicas/);
    await refused(['image.digest=latest'], /digest/);
    await refused(['kubernetesServicePort=0'], /kubernetesServicePort/);
    await refused(['tls.certificateLifetime=forever'], /certificateLifetime/);
    await refused(['tls.mode=certManager'], /needs cert-manager/);
    await refused(['agent.socketDir=/var/lib/lockstep'], /must be different directories/);
  });

  describe('on a cluster of three kwok nodes', () => {
    let cluster: KwokCluster;
    beforeAll(async () => {
      cluster = await startKwokCluster(['kwok-a', 'kwok-b', 'kwok-c']);
    }, 120_000);
    afterAll(() => cluster?.stop());
    const k = (...args: string[]) => kubectl(cluster.kubeconfig, args);
    const json = <T>(...args: string[]) => JSON.parse(k(...args, '-o', 'json')) as T;

    it('is accepted by the API server where privileged pods are allowed; in a restricted namespace only the agent draws a Pod Security warning', async () => {
      k('create', 'namespace', 'dry-privileged');
      k('label', 'namespace', 'dry-privileged', 'pod-security.kubernetes.io/enforce=privileged');
      k('create', 'namespace', 'dry-restricted');
      k('label', 'namespace', 'dry-restricted', 'pod-security.kubernetes.io/enforce=restricted');
      const manifest = (ns: string, set: string) =>
        helm(['template', 'lockstep', chart, '--namespace', ns, '--set', set]);
      const apply = (ns: string, text: string) =>
        new Promise<{ stdout: string; stderr: string }>((resolve, reject) => {
          const child = execFile(
            testTool('kubectl'),
            [
              `--kubeconfig=${cluster.kubeconfig}`,
              'apply',
              '--dry-run=server',
              '-n',
              ns,
              '-f',
              '-',
            ],
            (err, stdout, stderr) =>
              err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve({ stdout, stderr }),
          );
          child.stdin?.end(text);
        });
      const privileged = await apply(
        'dry-privileged',
        await manifest('dry-privileged', 'mediator.enabled=true'),
      );
      expect(privileged.stdout).toMatch(
        /daemonset.apps\/lockstep-agent created \(server dry run\)/,
      );
      expect(privileged.stdout).toMatch(
        /deployment.apps\/lockstep-mediator created \(server dry run\)/,
      );
      expect(privileged.stderr).not.toMatch(/PodSecurity/);
      // Pod Security judges pods, so a workload object only draws a warning: the agent's.
      const restricted = await apply(
        'dry-restricted',
        await manifest('dry-restricted', 'mediator.enabled=true,crds.install=false'),
      );
      // One warning, the agent's: the operator and the mediator meet the restricted level.
      const warned = restricted.stderr.split('\n').filter((l) => /PodSecurity/.test(l));
      expect(warned).toHaveLength(1);
      expect(warned[0]).toMatch(/container "agent"/);
      expect(warned[0]).toMatch(/restricted volume type "hostPath"/);
    });

    it('installs with every pod scheduled and Ready, upgrades, and uninstalls all but the CRDs', async () => {
      k('create', 'namespace', NS);
      k('label', 'namespace', NS, 'pod-security.kubernetes.io/enforce=privileged');
      const installed = await helm(
        ['install', 'lockstep', chart, '--namespace', NS, '--wait', '--timeout', '3m'],
        cluster.kubeconfig,
      );
      expect(installed).toMatch(/STATUS: deployed/);
      expect(installed).toMatch(/kubectl get lockstepnodes/);
      await podsReady(cluster.kubeconfig, NS);

      interface Pod {
        metadata: { name: string; labels: Record<string, string> };
        spec: { nodeName?: string };
        status: { conditions?: { type: string; status: string }[] };
      }
      const pods = (component: string) =>
        json<{ items: Pod[] }>(
          'get',
          'pods',
          '-n',
          NS,
          '-l',
          `app.kubernetes.io/component=${component}`,
        ).items;
      const ready = (p: Pod) =>
        p.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false;
      const agents = pods('agent');
      expect(agents.map((p) => p.spec.nodeName).sort()).toEqual(cluster.nodes);
      expect(agents.every(ready)).toBe(true);
      const operators = pods('operator');
      expect(operators).toHaveLength(2);
      expect(operators.every(ready)).toBe(true);

      const upgraded = await helm(
        [
          'upgrade',
          'lockstep',
          chart,
          '--namespace',
          NS,
          '--wait',
          '--timeout',
          '3m',
          '--set',
          'operator.replicas=3,logLevel=debug',
        ],
        cluster.kubeconfig,
      );
      expect(upgraded).toMatch(/REVISION: 2/);
      const ds = json<{
        spec: PodSpecLike & {
          template: { spec: { containers: { env: { name: string; value?: string }[] }[] } };
        };
        status: { numberReady: number };
      }>('get', 'daemonset', 'lockstep-agent', '-n', NS);
      expect(ds.spec.template.spec.containers[0].env).toContainEqual({
        name: 'LOCKSTEP_LOG_LEVEL',
        value: 'debug',
      });
      expect(pods('operator').filter(ready)).toHaveLength(3);

      await helm(['uninstall', 'lockstep', '--namespace', NS, '--wait'], cluster.kubeconfig);
      const left = k(
        'get',
        'deployments,daemonsets,services,serviceaccounts,roles,rolebindings',
        '-n',
        NS,
        '-l',
        'app.kubernetes.io/name=lockstep',
        '-o',
        'name',
      );
      expect(left.trim()).toBe('');
      expect(k('get', 'clusterroles,clusterrolebindings', '-o', 'name')).not.toMatch(/lockstep/);
      expect(k('get', 'crds', '-o', 'name').trim().split('\n').sort()).toEqual(
        readdirSync(path.join(chart, 'files', 'crds'))
          .map((f) => `customresourcedefinition.apiextensions.k8s.io/${f.replace(/\.yaml$/, '')}`)
          .sort(),
      );
    });
  });
});
