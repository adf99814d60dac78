// The child process of certificate-request-process.ts: makes a key and a PKCS#10 request for the
// identity given as its argument (JSON), writes both to stdout as JSON, and exits.
import { createCertificateRequest } from './certificate-authority';
import type { Identity } from './identity';

createCertificateRequest(JSON.parse(process.argv[2] ?? '') as Identity).then(
  (request) => process.stdout.write(JSON.stringify(request)),
  (err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
