// A TLS directory as the components read it: each way the files can be wrong is a clear error
// at start, and a rotation is taken up only when it is whole and for the same identity.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import {
  createAuthority,
  issueCertificate,
  type Authority,
} from '../../lib/tls/certificate-authority';
import { TlsDir, writeTlsDir } from '../../lib/tls/tls-dir';

const DAY = 86_400_000;
const node = { role: 'agent', name: 'node-a' } as const;

describe('TLS directories', () => {
  let root: string;
  let ca: Authority;
  let other: Authority;
  const opened: TlsDir[] = [];
  const open = async (dir: string) => {
    const d = await TlsDir.open(dir, { refreshMs: 50, log: pino({ level: 'silent' }) });
    opened.push(d);
    return d;
  };

  beforeAll(async () => {
    ca = await createAuthority('Test CA');
    other = await createAuthority('Other CA');
  });
  beforeEach(() => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-tls-dir-'));
  });
  afterEach(() => {
    for (const d of opened.splice(0)) d.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('reads a directory and says whom it holds', async () => {
    await writeTlsDir(root, ca.certPem, await issueCertificate(ca, node, { validMs: DAY }));
    const d = await open(root);
    expect(d.identity).toEqual(node);
    expect(d.notAfter.getTime()).toBeGreaterThan(Date.now() + DAY - 60_000);
  });

  it('refuses missing files, garbage, a key of another certificate, another CA and an expired certificate', async () => {
    await expect(open(root)).rejects.toThrow(/cannot read ca\.crt in the TLS directory/);
    const a = await issueCertificate(ca, node, { validMs: DAY });
    const b = await issueCertificate(ca, node, { validMs: DAY });
    await writeTlsDir(root, ca.certPem, a);
    writeFileSync(path.join(root, 'tls.crt'), 'not a certificate');
    await expect(open(root)).rejects.toThrow(/tls\.crt or ca\.crt is not a PEM certificate/);
    await writeTlsDir(root, ca.certPem, { certPem: a.certPem, keyPem: b.keyPem });
    await expect(open(root)).rejects.toThrow(/tls\.key is not the key of tls\.crt/);
    await writeTlsDir(root, ca.certPem, await issueCertificate(other, node, { validMs: DAY }));
    await expect(open(root)).rejects.toThrow(/tls\.crt was not issued by a CA in ca\.crt/);
    await writeTlsDir(root, ca.certPem, await issueCertificate(ca, node, { validMs: -60_000 }));
    await expect(open(root)).rejects.toThrow(/tls\.crt expired at .*issue a new one/);
  });

  it('accepts a CA bundle, as during a CA rotation', async () => {
    const cert = await issueCertificate(other, node, { validMs: DAY });
    await writeTlsDir(root, `${ca.certPem}\n${other.certPem}`, cert);
    expect((await open(root)).identity).toEqual(node);
  });

  it('takes up a rotation once it is whole, and never one for someone else', async () => {
    const first = await issueCertificate(ca, node, { validMs: DAY });
    await writeTlsDir(root, ca.certPem, first);
    const d = await open(root);
    const changes: string[] = [];
    d.onChange((m) => changes.push(m.cert));
    const context = d.secureContext;

    // Half-written: the new certificate beside the old key.
    const second = await issueCertificate(ca, node, { validMs: 2 * DAY });
    writeFileSync(path.join(root, 'tls.crt'), second.certPem);
    await new Promise((r) => setTimeout(r, 300));
    expect(d.current.cert).toBe(first.certPem);
    expect(changes).toEqual([]);

    writeFileSync(path.join(root, 'tls.key'), second.keyPem);
    await waitUntil(() => changes.length === 1);
    expect(d.current.cert).toBe(second.certPem);
    expect(d.secureContext).not.toBe(context);
    expect(d.notAfter.getTime()).toBeGreaterThan(Date.now() + 2 * DAY - 60_000);

    // Another identity is refused; the current one stays.
    await writeTlsDir(
      root,
      ca.certPem,
      await issueCertificate(ca, { role: 'agent', name: 'node-b' }, { validMs: DAY }),
    );
    await new Promise((r) => setTimeout(r, 300));
    expect(d.current.cert).toBe(second.certPem);
    expect(d.identity).toEqual(node);
    expect(changes).toHaveLength(1);
  });
});

async function waitUntil(ok: () => boolean): Promise<void> {
  for (let i = 0; i < 100 && !ok(); i++) await new Promise((r) => setTimeout(r, 20));
  expect(ok()).toBe(true);
}
