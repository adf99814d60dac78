// A full disk, on either side of a replication, on a real (loop-mounted ext4) filesystem: the
// workload gets ENOSPC for what cannot be written and keeps everything it had, the primary says
// why a replica cannot catch up, and once space is freed the copies end identical.
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, run } from '../harness/agent-process';
import { SmallFilesystem } from '../harness/small-filesystem';
import {
  expectIdentical,
  inSync,
  peerOf,
  replicationAgent,
  waitPeer,
} from '../harness/replication';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('a full disk', () => {
  const agents: AgentProcess[] = [];
  const filesystems: SmallFilesystem[] = [];
  // Logs of an agent whose disk fills up go elsewhere, where they can still be written.
  let logDir: string;
  beforeEach(() => {
    logDir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-full-disk-logs-'));
  });
  afterEach(async () => {
    for (const a of agents.splice(0)) await a.dispose();
    for (const f of filesystems.splice(0)) f.dispose();
    rmSync(logDir, { recursive: true, force: true });
  });

  const agentOn = async (node: string, fs?: SmallFilesystem) => {
    let agent: AgentProcess;
    if (fs) {
      const dataDir = path.join(fs.mountPoint, node);
      mkdirSync(dataDir);
      agent = new AgentProcess({
        node,
        dataDir,
        logDir,
        extraArgs: ['--peer-timeout', '1500'],
      });
    } else {
      agent = replicationAgent(node);
    }
    agents.push(agent);
    return agent.start();
  };
  const smallFs = (sizeMiB: number, ballastMiB: number) => {
    const fs = SmallFilesystem.create(sizeMiB, ballastMiB);
    filesystems.push(fs);
    return fs;
  };

  it('on a replica during its baseline: the primary keeps serving, says why, and finishes once space is freed', async () => {
    const fs = smallFs(128, 88);
    const a = await agentOn('node-a');
    const b = await agentOn('node-b', fs);
    const uri = await a.createVolume('v', '64MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 60m', uri]);
    expect(fs.freeBytes()).toBeLessThan(50 * MiB); // the baseline cannot fit

    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    const stuck = await waitPeer(
      a,
      'v',
      b,
      (p) => /no space left on its disk \(ENOSPC\)/.test(p.reason),
      'ENOSPC reported',
      30_000,
    );
    expect(stuck.state).not.toBe('InSync');
    // Sync mode: the workload is not held hostage by a replica that cannot write.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 62m 1m', uri]);
    // The peer accepts connections and fails every catch-up: it is retried with backoff
    // (0.2, 0.4, 0.8, 1.6 s...), not five times a second with the baseline re-sent each time.
    await sleep(3000);
    const connects = readFileSync(a.proc.logPath, 'utf8').match(/"peer connected"/g) ?? [];
    expect(connects.length).toBeLessThanOrEqual(7);

    fs.dropBallast();
    await waitPeer(a, 'v', b, inSync, 'in sync once space is freed', 60_000);
    await expectIdentical(a, b, 'v');
  });

  it('on the primary: the write gets ENOSPC, nothing it had is lost, and writes work again once space is freed', async () => {
    const fs = smallFs(96, 72);
    const a = await agentOn('node-a', fs);
    const b = await agentOn('node-b');
    const uri = await a.createVolume('v', '64MiB');
    await a.ctl('replicate', 'v', '--to', b.grpcAddress);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4m', uri]);

    await expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 8m 48m', uri])).rejects.toThrow(
      /write failed: No space left on device/,
    );
    expect(await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x11 0 4m', uri])).not.toMatch(
      /Pattern verification failed|error/i,
    );

    fs.dropBallast();
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 8m 48m', uri]);
    await waitPeer(a, 'v', b, inSync, 'in sync after the failed write', 60_000);
    expect(await peerOf(a, 'v', b)).toMatchObject({ state: 'InSync', dirtyBytes: 0 });
    await expectIdentical(a, b, 'v');
  });
});
