// The few Kubernetes API calls the agent and the mediator make (their LockstepNode and Lease,
// their certificate requests), as plain JSON over one keep-alive HTTPS agent.
// @kubernetes/client-node would cost them ~50 MiB of memory for these; the operator, which
// watches and writes many kinds, keeps it (lib/kube.ts).
import { readFile } from 'node:fs/promises';
import https from 'node:https';
import { LockstepError, errorMessage } from '../errors';
import type { BearerToken, RestConfig } from './config';

/** The metadata fields our callers read or write. */
export interface ObjectMeta {
  name?: string;
  generateName?: string;
  namespace?: string;
  uid?: string;
  resourceVersion?: string;
  ownerReferences?: OwnerReference[];
}

export interface OwnerReference {
  apiVersion: string;
  kind: string;
  name: string;
  uid: string;
}

/** The API server refused a request; `status` is its HTTP status. */
export class KubeApiError extends LockstepError {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super('LOCKSTEP_ERR_KUBE_API', message);
    this.name = 'KubeApiError';
  }
}

export const isNotFound = (err: unknown): boolean =>
  err instanceof KubeApiError && err.status === 404;
/** An optimistic-concurrency conflict, or a create of something that exists. */
export const isConflict = (err: unknown): boolean =>
  err instanceof KubeApiError && err.status === 409;

/** A request with no answer in this long fails (a half-open connection would never end). */
const REQUEST_TIMEOUT_MS = 30_000;
/** As client-go: a token file is read again at most this often, so rotations are taken up. */
const TOKEN_REFRESH_MS = 60_000;

export class KubeClient {
  private readonly base: URL;
  private readonly agent: https.Agent;
  private fileToken: { value: string; readAtMs: number } | undefined;

  constructor(private readonly config: RestConfig) {
    this.base = new URL(config.server);
    this.agent = new https.Agent({
      keepAlive: true,
      ca: config.ca,
      cert: config.clientCertificate?.cert,
      key: config.clientCertificate?.key,
      rejectUnauthorized: !config.insecureSkipTlsVerify,
    });
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  create<T extends object>(path: string, body: T): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  /** Fails with a conflict if the object changed since `body` (its resourceVersion) was read. */
  replace<T extends object>(path: string, body: T): Promise<T> {
    return this.request<T>('PUT', path, body);
  }

  /** An RFC 7386 merge patch: the fields given replace, null deletes. */
  mergePatch<T>(path: string, patch: object): Promise<T> {
    return this.request<T>('PATCH', path, patch, 'application/merge-patch+json');
  }

  private async request<T>(
    method: string,
    path: string,
    body?: object,
    contentType = 'application/json',
  ): Promise<T> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string> = { Accept: 'application/json' };
    const token = await this.token();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (payload) headers['Content-Type'] = contentType;
    return new Promise<T>((resolve, reject) => {
      const req = https.request(
        {
          agent: this.agent,
          method,
          hostname: this.base.hostname.replace(/^\[(.*)\]$/, '$1'),
          port: this.base.port || 443,
          path: this.base.pathname.replace(/\/$/, '') + path,
          headers,
          timeout: REQUEST_TIMEOUT_MS,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (chunk: Buffer) => chunks.push(chunk));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString();
            const status = res.statusCode ?? 0;
            if (status >= 200 && status < 300) {
              try {
                resolve(JSON.parse(text) as T);
              } catch {
                reject(new KubeApiError(status, `${method} ${path}: the answer is not JSON`));
              }
            } else reject(refusal(method, path, status, text));
          });
        },
      );
      req.on('timeout', () =>
        req.destroy(
          new LockstepError(
            'LOCKSTEP_ERR_UNAVAILABLE',
            `${method} ${path}: no answer from ${this.base.origin} in ${REQUEST_TIMEOUT_MS / 1000} s`,
          ),
        ),
      );
      req.on('error', reject);
      req.end(payload);
    });
  }

  private async token(): Promise<string | undefined> {
    const source: BearerToken | undefined = this.config.token;
    if (!source) return undefined;
    switch (source.kind) {
      case 'value':
        return source.value;
      case 'file': {
        const now = Date.now();
        if (!this.fileToken || now - this.fileToken.readAtMs >= TOKEN_REFRESH_MS)
          this.fileToken = { value: await readToken(source.file), readAtMs: now };
        return this.fileToken.value;
      }
    }
  }
}

async function readToken(file: string): Promise<string> {
  try {
    return (await readFile(file, 'utf8')).trim();
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_UNAVAILABLE',
      `cannot read the bearer token (${file}): ${errorMessage(err)}`,
    );
  }
}

/** The API server's own words (its Status body), and what to look at for the usual refusals. */
function refusal(method: string, path: string, status: number, body: string): KubeApiError {
  let message = '';
  try {
    message = (JSON.parse(body) as { message?: string }).message ?? '';
  } catch {
    // not a Status body (a proxy's page): the HTTP status says enough
  }
  const hint =
    status === 401
      ? ' (the token or certificate was not accepted: expired, or for another cluster?)'
      : status === 403
        ? ' (check the RBAC rules of this ServiceAccount)'
        : '';
  return new KubeApiError(
    status,
    `${method} ${path}: HTTP ${status}${message ? `: ${message}` : ''}${hint}`,
  );
}
