// The tests' Lockstep CA: made once per test process, in a temp dir removed at exit, with a
// TLS directory per identity issued on first use. Every agent, mediator and operator a test
// starts speaks mutual TLS with these, as a deployment would; the test's own clients are an
// administrator.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import {
  createAuthority,
  issueCertificate,
  writeGnutlsClientFiles,
  type Authority,
} from '../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../lib/tls/tls-dir';
import type { Identity } from '../../lib/tls/identity';
import { openTransport, type Transport } from '../../lib/tls/transport';

interface TestCa {
  root: string;
  ca: Authority;
  admin: Transport;
}

let made: Promise<TestCa> | undefined;
let ready: TestCa | undefined;
const issued = new Map<string, Promise<string>>();

/** The CA, made on first call. */
export function testCa(): Promise<TestCa> {
  made ??= (async () => {
    const root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-test-ca-'));
    // Outside jest (the benches); in a test file the afterAll below removes it.
    process.once('exit', () => rmSync(root, { recursive: true, force: true }));
    const ca = await createAuthority('Lockstep test CA');
    const adminDir = path.join(root, 'admin-admin');
    await writeTlsDir(adminDir, ca.certPem, await issueCertificate(ca, ADMIN, { validMs: DAY }));
    const admin = await openTransport({ tlsDir: adminDir }, pino({ level: 'silent' }));
    ready = { root, ca, admin };
    return ready;
  })();
  return made;
}

// Jest's sandboxed `process` does not see the worker exit: each test file removes its CA.
if (typeof afterAll === 'function')
  afterAll(async () => {
    if (made) rmSync((await made).root, { recursive: true, force: true });
  });

const DAY = 86_400_000;
const ADMIN: Identity = { role: 'admin', name: 'admin' };

/** A TLS directory holding a certificate for `id` from the test CA (issued once). */
export function tlsDirFor(id: Identity): Promise<string> {
  const key = `${id.role}-${id.name}`;
  let dir = issued.get(key);
  if (!dir) {
    dir = (async () => {
      const { root, ca } = await testCa();
      const out = path.join(root, key);
      if (key !== 'admin-admin') {
        // Agents are dialled at 127.0.0.1 by NBD clients that check the name (qemu, libnbd).
        const names = id.role === 'agent' ? { dnsNames: [id.name], ips: ['127.0.0.1'] } : {};
        const cert = await issueCertificate(ca, id, { validMs: DAY, ...names });
        await writeTlsDir(out, ca.certPem, cert);
        if (id.role === 'client') await writeGnutlsClientFiles(out, ca.certPem, cert);
      }
      return out;
    })();
    issued.set(key, dir);
  }
  return dir;
}

/**
 * The administrator's transport, for a test's own clients. Available once anything that
 * started a process (which makes the CA) has run; a test always starts one before calling it.
 */
export function adminTransport(): Transport {
  if (!ready) throw new Error('the test CA is not made yet: start an agent or mediator first');
  return ready.admin;
}

/** A transport holding `id`'s certificate: a test that plays an agent, or a stranger. */
export async function transportAs(id: Identity): Promise<Transport> {
  return openTransport({ tlsDir: await tlsDirFor(id) }, pino({ level: 'silent' }));
}
