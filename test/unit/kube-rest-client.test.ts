// The agent's and the mediator's Kubernetes client against a loopback HTTPS server standing in
// for the API server: it verifies the server with the configured CA, sends the bearer token and
// the merge-patch content type, and a refusal is a KubeApiError with the status and the
// server's own message.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { KubeApiError, KubeClient, isConflict, isNotFound } from '../../lib/kube-rest/client';
import type { RestConfig } from '../../lib/kube-rest/config';
import { createAuthority, issueCertificate } from '../../lib/tls/certificate-authority';

interface Seen {
  method: string;
  url: string;
  authorization?: string;
  contentType?: string;
  body: string;
}

describe('Kubernetes REST client', () => {
  let dir: string;
  let server: https.Server;
  let config: RestConfig;
  const seen: Seen[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-kube-client-'));
    const ca = await createAuthority('Test API CA');
    const cert = await issueCertificate(
      ca,
      { role: 'operator', name: 'apiserver' },
      { validMs: 3_600_000, ips: ['127.0.0.1'] },
    );
    server = https.createServer({ cert: cert.certPem, key: cert.keyPem }, (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks).toString();
        seen.push({
          method: req.method ?? '',
          url: req.url ?? '',
          authorization: req.headers.authorization,
          contentType: req.headers['content-type'],
          body,
        });
        const [status, answer] = req.url?.endsWith('/missing')
          ? [404, { kind: 'Status', message: 'leases "missing" not found' }]
          : req.method === 'PUT'
            ? [409, { kind: 'Status', message: 'the object has been modified' }]
            : [200, { echoed: body ? (JSON.parse(body) as unknown) : null }];
        res.writeHead(status, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify(answer));
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    writeFileSync(path.join(dir, 'token'), 'from-a-file\n');
    config = {
      server: `https://127.0.0.1:${(server.address() as AddressInfo).port}/prefix/`,
      ca: Buffer.from(ca.certPem),
      token: { kind: 'file', file: path.join(dir, 'token') },
      insecureSkipTlsVerify: false,
    };
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(() => seen.splice(0));

  it('sends JSON with the token read from its file, under the server’s path prefix', async () => {
    const kube = new KubeClient(config);
    await expect(kube.create('/api/v1/things', { a: 1 })).resolves.toEqual({ echoed: { a: 1 } });
    await kube.mergePatch('/api/v1/things/t', { spec: { b: null } });
    expect(seen).toEqual([
      {
        method: 'POST',
        url: '/prefix/api/v1/things',
        authorization: 'Bearer from-a-file',
        contentType: 'application/json',
        body: '{"a":1}',
      },
      {
        method: 'PATCH',
        url: '/prefix/api/v1/things/t',
        authorization: 'Bearer from-a-file',
        contentType: 'application/merge-patch+json',
        body: '{"spec":{"b":null}}',
      },
    ]);
  });

  it('makes a refusal a KubeApiError with the status and the server’s message', async () => {
    const kube = new KubeClient(config);
    const missing = await kube.get('/apis/x/missing').catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(KubeApiError);
    expect(missing).toMatchObject({ status: 404, code: 'LOCKSTEP_ERR_KUBE_API' });
    expect((missing as Error).message).toBe(
      'GET /apis/x/missing: HTTP 404: leases "missing" not found',
    );
    expect(isNotFound(missing)).toBe(true);
    const conflict = await kube.replace('/apis/x/y', { a: 1 }).catch((e: unknown) => e);
    expect(isConflict(conflict)).toBe(true);
    expect(isNotFound(conflict)).toBe(false);
  });

  it('refuses a server its CA did not sign, unless told to skip verification', async () => {
    const other = await createAuthority('Another CA');
    const strict = new KubeClient({ ...config, ca: Buffer.from(other.certPem) });
    await expect(strict.get('/api')).rejects.toThrow(/certificate/);
    const trusting = new KubeClient({ ...config, ca: undefined, insecureSkipTlsVerify: true });
    await expect(trusting.get('/api')).resolves.toEqual({ echoed: null });
  });
});
