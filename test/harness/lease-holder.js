// Runs one LeaderElector in a process of its own, so a test can SIGKILL a leader: a death with
// no release and no last renewal. Prints "leading" once it leads and "lost" if it stops.
// Usage: node lease-holder.js KUBECONFIG NAMESPACE NAME IDENTITY LEASE_MS RENEW_MS RETRY_MS
//
// It loads the TypeScript sources directly (transpiled on require, as jest does), so the test
// runs what is in the tree, not a stale build.
'use strict';
const fs = require('node:fs');
const ts = require('typescript');

require.extensions['.ts'] = (module, filename) => {
  const { outputText } = ts.transpileModule(fs.readFileSync(filename, 'utf8'), {
    fileName: filename,
    compilerOptions: {
      module: ts.ModuleKind.CommonJS,
      target: ts.ScriptTarget.ES2022,
      esModuleInterop: true,
    },
  });
  module._compile(outputText, filename);
};

const { KubeConfig } = require('@kubernetes/client-node');
const { createLogger } = require('../../lib/logger.ts');
const { LeaderElector } = require('../../operator/src/leader/lease-election.ts');

const [kubeconfig, namespace, name, identity, leaseMs, renewMs, retryMs] = process.argv.slice(2);
const kc = new KubeConfig();
kc.loadFromFile(kubeconfig);
const elector = new LeaderElector({
  kc,
  namespace,
  name,
  identity,
  leaseDurationMs: Number(leaseMs),
  renewDeadlineMs: Number(renewMs),
  retryPeriodMs: Number(retryMs),
  log: createLogger('lease-holder'),
});
void elector.lost.then(() => {
  process.stdout.write('lost\n');
  process.exit(1);
});
elector.acquire().then(
  () => process.stdout.write('leading\n'),
  (err) => {
    process.stderr.write(`${err.stack}\n`);
    process.exit(2);
  },
);
