// The README's main command: `lockstep demo` runs the whole failover loop and exits 0 only if
// every acknowledged write survived the primary's SIGKILL.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { lockstepBin } from '../harness/agent-process';
import { productNode } from '../harness/product-runtime';

describe('lockstep demo', () => {
  it('fails over without losing an acknowledged write', async () => {
    const { stdout } = await promisify(execFile)(
      productNode(),
      [lockstepBin, 'demo', '--seconds', '2'],
      { timeout: 120_000 },
    );
    expect(stdout).toMatch(/SIGKILL node-a with writes in flight \((\d+) acknowledged/);
    const m = /summary: (\d+) acknowledged writes, (\d+) found on the replica, 0 missing/.exec(
      stdout,
    );
    expect(m).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThan(1000);
    expect(m![2]).toBe(m![1]);
    expect(stdout).toContain('RPO = 0');
    // No command promoted node-b: the mediator granted it the next epoch.
    const took = /node-b is primary in epoch (\d+), (\d+) ms after the kill/.exec(stdout);
    expect(took).not.toBeNull();
    expect(Number(took![1])).toBeGreaterThanOrEqual(3);
    expect(stdout).toMatch(/node-a is a secondary of node-b again/);
  });
});
