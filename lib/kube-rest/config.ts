// Where the Kubernetes API server is and how the agent or the mediator proves who it is there:
// from a kubeconfig file (--kubeconfig, else $KUBECONFIG) or, in a pod, from the environment
// and the mounted ServiceAccount. Only what our deployments use is supported (a CA, a client
// certificate, a bearer token); anything else is refused by name rather than ignored.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { load } from 'js-yaml';
import { LockstepError, errorMessage } from '../errors';

export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

/** A bearer token as given, or a file read again now and then (bound tokens are rotated). */
export type BearerToken = { kind: 'value'; value: string } | { kind: 'file'; file: string };

export interface RestConfig {
  /** The API server's URL, https:// (with any path prefix a proxy in front of it needs). */
  server: string;
  /** PEM certificates to verify the server with; absent: Node's default roots. */
  ca?: Buffer;
  /** A client certificate and its key, PEM. */
  clientCertificate?: { cert: Buffer; key: Buffer };
  token?: BearerToken;
  insecureSkipTlsVerify: boolean;
}

/** An explicit kubeconfig file, else $KUBECONFIG, else the pod's own ServiceAccount. */
export function loadRestConfig(file?: string, env: NodeJS.ProcessEnv = process.env): RestConfig {
  const kubeconfig = file ?? env.KUBECONFIG;
  if (kubeconfig) {
    if (kubeconfig.includes(path.delimiter))
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `$KUBECONFIG lists several files (${kubeconfig}); name one with --kubeconfig`,
      );
    return kubeconfigFile(kubeconfig);
  }
  if (env.KUBERNETES_SERVICE_HOST) return inCluster(env);
  throw new LockstepError(
    'LOCKSTEP_ERR_INVALID_ARGUMENT',
    'no Kubernetes API server to talk to: pass --kubeconfig, set $KUBECONFIG, or run in a pod',
  );
}

/** As client-go's rest.InClusterConfig: the service's address, the mounted CA and token. */
export function inCluster(env: NodeJS.ProcessEnv, dir = SERVICE_ACCOUNT_DIR): RestConfig {
  const host = env.KUBERNETES_SERVICE_HOST;
  const port = env.KUBERNETES_SERVICE_PORT;
  if (!host || !port)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      'in a pod, KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must both be set',
    );
  return {
    server: `https://${host.includes(':') ? `[${host}]` : host}:${port}`,
    ca: readFile(path.join(dir, 'ca.crt'), 'the ServiceAccount CA'),
    token: { kind: 'file', file: path.join(dir, 'token') },
    insecureSkipTlsVerify: false,
  };
}

/** Ways of logging in we do not implement: a kubeconfig that uses one is refused. */
const UNSUPPORTED_USER_FIELDS = ['exec', 'auth-provider', 'username', 'as'];

export function kubeconfigFile(file: string): RestConfig {
  const fail = (what: string) =>
    new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `kubeconfig ${file}: ${what}`);
  let doc: unknown;
  try {
    doc = load(readFile(file, 'the kubeconfig').toString());
  } catch (err) {
    if (err instanceof LockstepError) throw err;
    throw fail(`not YAML (${errorMessage(err)})`);
  }
  if (!isRecord(doc)) throw fail('not a kubeconfig (expected a mapping)');
  const field = (entry: Entry, name: string): string | undefined => {
    const v = entry.fields[name];
    if (v === undefined || typeof v === 'string') return v;
    throw fail(`${entry.what} ${entry.name}: ${name} is not a string`);
  };
  const currentContext = doc['current-context'];
  if (typeof currentContext !== 'string' || !currentContext) throw fail('no current-context');
  const context = named(doc, 'context', currentContext, fail);
  const clusterName = field(context, 'cluster');
  if (!clusterName) throw fail(`context ${currentContext} names no cluster`);
  const cluster = named(doc, 'cluster', clusterName, fail);
  const userName = field(context, 'user');
  const user: Entry = userName
    ? named(doc, 'user', userName, fail)
    : { what: 'user', name: '(none)', fields: {} };
  const unsupported = UNSUPPORTED_USER_FIELDS.filter((f) => f in user.fields);
  if (unsupported.length)
    throw fail(
      `user ${user.name} logs in with ${unsupported.join(', ')}, which this client does not ` +
        'support: give it a token or a client certificate',
    );
  const server = field(cluster, 'server');
  if (!server?.startsWith('https://'))
    throw fail(`cluster ${clusterName} needs an https:// server`);
  // Relative paths in a kubeconfig are relative to the file, as kubectl reads them.
  const dir = path.dirname(file);
  const material = (entry: Entry, name: string, what: string): Buffer | undefined => {
    const data = field(entry, `${name}-data`);
    if (data !== undefined) return Buffer.from(data, 'base64');
    const file = field(entry, name);
    return file === undefined ? undefined : readFile(path.resolve(dir, file), what);
  };
  const cert = material(user, 'client-certificate', `user ${user.name}'s certificate`);
  const key = material(user, 'client-key', `user ${user.name}'s key`);
  if (!cert !== !key) throw fail(`user ${user.name} needs both a client certificate and its key`);
  const token = field(user, 'token');
  const tokenFile = field(user, 'tokenFile');
  const insecure = cluster.fields['insecure-skip-tls-verify'];
  if (insecure !== undefined && typeof insecure !== 'boolean')
    throw fail(`cluster ${clusterName}: insecure-skip-tls-verify is not true or false`);
  return {
    server,
    ca: material(cluster, 'certificate-authority', `cluster ${clusterName}'s CA`),
    clientCertificate: cert && key ? { cert, key } : undefined,
    token: token
      ? { kind: 'value', value: token }
      : tokenFile
        ? { kind: 'file', file: path.resolve(dir, tokenFile) }
        : undefined,
    insecureSkipTlsVerify: insecure === true,
  };
}

/** One entry of a kubeconfig's contexts, clusters or users: `{name, context: {...}}`. */
interface Entry {
  what: 'context' | 'cluster' | 'user';
  name: string;
  fields: Record<string, unknown>;
}

function named(
  doc: Record<string, unknown>,
  what: Entry['what'],
  name: string,
  fail: (what: string) => Error,
): Entry {
  const list = doc[`${what}s`];
  const entry = Array.isArray(list)
    ? (list as unknown[]).find((e) => isRecord(e) && e.name === name)
    : undefined;
  const fields = isRecord(entry) ? entry[what] : undefined;
  if (!isRecord(fields)) throw fail(`no ${what} named ${name}`);
  return { what, name, fields };
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function readFile(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `cannot read ${what} (${file}): ${errorMessage(err)}`,
    );
  }
}
