// The child process that makes certificate requests: its answer is checked, and a child that
// fails or prints something else is a clear error, never a crash of the agent asking.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readCertificateRequest } from '../../lib/tls/certificate-authority';
import { runRequestChild } from '../../lib/tls/certificate-request-process';

const ID = { role: 'agent', name: 'node-a' } as const;

describe('a certificate request made in a child process', () => {
  let dir: string;
  const script = (body: string) => {
    const file = path.join(dir, `child-${Math.random().toString(36).slice(2)}.js`);
    writeFileSync(file, body);
    return file;
  };

  beforeAll(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-csr-child-'))));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('returns the real child’s request and key', async () => {
    // The built child (npm test builds first): a PKCS#10 request and a PKCS#8 key for the id.
    const built = path.resolve(__dirname, '../../dist/lib/tls/certificate-request-child.js');
    const { requestPem, keyPem } = await runRequestChild(built, ID);
    expect(requestPem).toMatch(/^-----BEGIN CERTIFICATE REQUEST-----/);
    expect(keyPem).toMatch(/^-----BEGIN PRIVATE KEY-----/);
    expect((await readCertificateRequest(requestPem)).subject).toContain('CN=node-a');
  });

  it('refuses output that is not JSON', async () => {
    await expect(runRequestChild(script('process.stdout.write("hello")'), ID)).rejects.toThrow(
      /certificate request failed: its output is not JSON/,
    );
  });

  it('refuses JSON without a request and a key', async () => {
    await expect(
      runRequestChild(script('process.stdout.write(JSON.stringify({ requestPem: 1 }))'), ID),
    ).rejects.toThrow(/has no request and key/);
  });

  it('reports a failing child with its exit code and message', async () => {
    await expect(
      runRequestChild(script('console.error("no entropy"); process.exit(3)'), ID),
    ).rejects.toThrow(/exit 3: no entropy/);
  });
});
