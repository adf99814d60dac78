// A certificate request made in a short-lived child process. The agent and the mediator run
// for months and ask for a certificate now and then; making the request takes @peculiar/x509
// (with its dependencies ~6 MiB of memory that a process never gives back once loaded). The
// child loads it, makes the key and the request, hands both back on its stdout (a pipe: the
// key is never written anywhere) and exits, taking that memory with it.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { LockstepError } from '../errors';
import type { Identity } from './identity';

export interface CertificateRequest {
  requestPem: string;
  keyPem: string;
}

/** Runs certificate-request-child.js for `id`, on the same Node. */
export function createCertificateRequestApart(id: Identity): Promise<CertificateRequest> {
  return runRequestChild(path.join(__dirname, 'certificate-request-child.js'), id);
}

/** Runs `script` for `id`; what it prints must be a request and its key, or this rejects. */
export function runRequestChild(script: string, id: Identity): Promise<CertificateRequest> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, JSON.stringify(id)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.on('error', reject);
    child.on('close', (code) => {
      const failed = (why: string) =>
        reject(
          new LockstepError(
            'LOCKSTEP_ERR_UNAVAILABLE',
            `making a certificate request failed: ${why}`,
          ),
        );
      if (code !== 0) {
        failed(`exit ${code}: ${Buffer.concat(err).toString().trim()}`);
        return;
      }
      let answer: unknown;
      try {
        answer = JSON.parse(Buffer.concat(out).toString());
      } catch {
        failed('its output is not JSON');
        return;
      }
      const { requestPem, keyPem } = (answer ?? {}) as Partial<Record<string, unknown>>;
      if (typeof requestPem !== 'string' || typeof keyPem !== 'string') {
        failed('its output has no request and key');
        return;
      }
      resolve({ requestPem, keyPem });
    });
  });
}
