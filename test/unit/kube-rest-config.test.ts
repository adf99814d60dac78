// Where the agent's and the mediator's Kubernetes client finds its API server and credentials:
// the kubeconfig fields our deployments and tests use, the pod's ServiceAccount, which wins when
// several are there, and a clear refusal of what is not supported.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { inCluster, kubeconfigFile, loadRestConfig } from '../../lib/kube-rest/config';

const CA = '-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n';
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('Kubernetes client configuration', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-kube-config-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const write = (name: string, text: string) => {
    const file = path.join(dir, name);
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, text);
    return file;
  };

  /** A kubeconfig of two clusters and users, `current` naming the context in use. */
  const kubeconfig = (current: string, user = 'token: abc', name = 'kube/config') =>
    write(
      name,
      [
        'apiVersion: v1',
        'kind: Config',
        'clusters:',
        '- name: other',
        '  cluster:',
        '    server: https://other.example:6443',
        '- name: test',
        '  cluster:',
        '    server: https://127.0.0.1:6443/prefix',
        `    certificate-authority-data: ${b64(CA)}`,
        'users:',
        '- name: someone-else',
        '  user:',
        '    token: not-this-one',
        '- name: admin',
        '  user:',
        `    ${user}`,
        'contexts:',
        '- name: elsewhere',
        '  context: { cluster: other, user: someone-else }',
        '- name: test',
        '  context:',
        '    cluster: test',
        '    user: admin',
        '    namespace: ignored',
        '  extensions: [{ name: minikube, extension: { version: 1 } }]',
        `current-context: ${current}`,
        '',
      ].join('\n'),
    );

  it('reads the current context: its server, CA data and token', () => {
    expect(kubeconfigFile(kubeconfig('test'))).toEqual({
      server: 'https://127.0.0.1:6443/prefix',
      ca: Buffer.from(CA),
      clientCertificate: undefined,
      token: { kind: 'value', value: 'abc' },
      insecureSkipTlsVerify: false,
    });
    expect(kubeconfigFile(kubeconfig('elsewhere'))).toMatchObject({
      server: 'https://other.example:6443',
      ca: undefined,
      token: { kind: 'value', value: 'not-this-one' },
    });
  });

  it('reads files named relative to the kubeconfig, and data given inline', () => {
    write('kube/certs/ca.crt', CA);
    write('kube/certs/admin.crt', 'cert');
    write('kube/certs/admin.key', 'key');
    const file = write(
      'kube/files.yaml',
      [
        'clusters: [{ name: c, cluster: { server: "https://h:1", certificate-authority: certs/ca.crt } }]',
        'users: [{ name: u, user: { client-certificate: certs/admin.crt, client-key: certs/admin.key } }]',
        'contexts: [{ name: x, context: { cluster: c, user: u } }]',
        'current-context: x',
      ].join('\n'),
    );
    expect(kubeconfigFile(file)).toMatchObject({
      ca: Buffer.from(CA),
      clientCertificate: { cert: Buffer.from('cert'), key: Buffer.from('key') },
      token: undefined,
    });
    const inline = write(
      'kube/inline.yaml',
      [
        'clusters: [{ name: c, cluster: { server: "https://h:1", insecure-skip-tls-verify: true } }]',
        `users: [{ name: u, user: { client-certificate-data: ${b64('cert')}, client-key-data: ${b64('key')} } }]`,
        'contexts: [{ name: x, context: { cluster: c, user: u } }]',
        'current-context: x',
      ].join('\n'),
    );
    expect(kubeconfigFile(inline)).toMatchObject({
      ca: undefined,
      clientCertificate: { cert: Buffer.from('cert'), key: Buffer.from('key') },
      insecureSkipTlsVerify: true,
    });
    expect(kubeconfigFile(kubeconfig('test', 'tokenFile: ../token'))).toMatchObject({
      token: { kind: 'file', file: path.join(dir, 'token') },
    });
  });

  it.each([
    [
      'no current context',
      (f: string) => f.replace(/current-context: .*/, ''),
      /no current-context/,
    ],
    [
      'an unknown context',
      (f: string) => f.replace('current-context: test', 'current-context: nope'),
      /no context named nope/,
    ],
    [
      'exec credentials',
      (f: string) => f.replace('token: abc', 'exec: { command: aws }'),
      /logs in with exec.*give it a token or a client certificate/,
    ],
    [
      'a certificate without its key',
      (f: string) => f.replace('token: abc', `client-certificate-data: ${b64('c')}`),
      /both a client certificate and its key/,
    ],
    [
      'a plain-http server',
      (f: string) => f.replace('https://127.0.0.1', 'http://127.0.0.1'),
      /needs an https:\/\/ server/,
    ],
    [
      'a token that is not a string',
      (f: string) => f.replace('token: abc', 'token: [a]'),
      /user admin: token is not a string/,
    ],
    ['YAML that is not a kubeconfig', () => '- a list', /expected a mapping/],
    ['a file that is not YAML', () => 'a: [', /not YAML/],
  ])('refuses %s, saying what is wrong', (_what, edit, message) => {
    const file = kubeconfig('test');
    writeFileSync(file, edit(readFileSync(file, 'utf8')));
    expect(() => kubeconfigFile(file)).toThrow(message);
  });

  it('in a pod, uses the service address and the mounted CA and token', () => {
    write('sa/ca.crt', CA);
    const sa = path.join(dir, 'sa');
    expect(
      inCluster({ KUBERNETES_SERVICE_HOST: '10.96.0.1', KUBERNETES_SERVICE_PORT: '443' }, sa),
    ).toEqual({
      server: 'https://10.96.0.1:443',
      ca: Buffer.from(CA),
      token: { kind: 'file', file: path.join(sa, 'token') },
      insecureSkipTlsVerify: false,
    });
    expect(
      inCluster({ KUBERNETES_SERVICE_HOST: 'fd00::1', KUBERNETES_SERVICE_PORT: '443' }, sa).server,
    ).toBe('https://[fd00::1]:443');
    expect(() => inCluster({ KUBERNETES_SERVICE_HOST: '10.96.0.1' }, sa)).toThrow(
      /KUBERNETES_SERVICE_PORT must both be set/,
    );
    expect(() =>
      inCluster({ KUBERNETES_SERVICE_HOST: 'h', KUBERNETES_SERVICE_PORT: '1' }, dir),
    ).toThrow(/cannot read the ServiceAccount CA/);
  });

  it('takes --kubeconfig, else $KUBECONFIG, else the pod’s ServiceAccount', () => {
    const flag = kubeconfig('test');
    const env = kubeconfig('elsewhere', 'token: abc', 'env.yaml');
    const pod = { KUBERNETES_SERVICE_HOST: 'h', KUBERNETES_SERVICE_PORT: '1' };
    expect(loadRestConfig(flag, { ...pod, KUBECONFIG: env }).server).toBe(
      'https://127.0.0.1:6443/prefix',
    );
    expect(loadRestConfig(undefined, { ...pod, KUBECONFIG: env }).server).toBe(
      'https://other.example:6443',
    );
    expect(() => loadRestConfig(undefined, pod)).toThrow(/ServiceAccount CA/);
    expect(() => loadRestConfig(undefined, {})).toThrow(/pass --kubeconfig, set \$KUBECONFIG/);
    expect(() =>
      loadRestConfig(undefined, { KUBECONFIG: [flag, env].join(path.delimiter) }),
    ).toThrow(/lists several files/);
  });
});
