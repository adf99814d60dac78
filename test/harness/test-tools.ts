// Locates the Go-built test tools (etcd, kube-apiserver, kubectl, helm, ...). They are built
// once into a cache keyed by their inputs by scripts/test-tools.sh, which is instant when warm.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';

const repoRoot = path.resolve(__dirname, '..', '..');

let cached: string | undefined;

export function testBinDir(): string {
  if (cached) return cached;
  const fromEnv = process.env.LOCKSTEP_TEST_BIN;
  const dir =
    fromEnv && existsSync(path.join(fromEnv, 'kube-apiserver'))
      ? fromEnv
      : execFileSync('bash', [path.join(repoRoot, 'scripts', 'test-tools.sh')], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'inherit'],
        }).trim();
  cached = dir;
  return dir;
}

export function testTool(
  name:
    | 'etcd'
    | 'kube-apiserver'
    | 'kube-controller-manager'
    | 'kube-scheduler'
    | 'kubelet'
    | 'kubectl'
    | 'helm'
    | 'kwok'
    | 'pause',
): string {
  return path.join(testBinDir(), name);
}
