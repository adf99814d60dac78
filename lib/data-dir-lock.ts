// One process (an agent, a mediator) per data directory. Node has no flock(2), so the lock is a pid file created with
// O_EXCL; a file left by a dead process (SIGKILL, power loss) is recognised as stale and taken
// over, one naming a live lockstep process is refused.
import { readFileSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { LockstepError } from './errors';

function lockstepProcessAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('lockstep');
  } catch {
    return false;
  }
}

export interface DataDirLock {
  release(): Promise<void>;
}

export async function lockDataDir(dataDir: string, owner = 'agent'): Promise<DataDirLock> {
  const file = path.join(dataDir, `${owner}.pid`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const handle = await fs.open(file, 'wx', 0o644);
      await handle.writeFile(`${process.pid}\n`);
      await handle.sync();
      await handle.close();
      return { release: () => fs.rm(file, { force: true }) };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = Number.parseInt(await fs.readFile(file, 'utf8').catch(() => ''), 10);
    if (lockstepProcessAlive(owner)) {
      throw new LockstepError(
        'LOCKSTEP_ERR_DATA_DIR_LOCKED',
        `data directory ${dataDir} is in use by lockstep process ${owner}; stop it first or use another --data-dir`,
      );
    }
    await fs.rm(file, { force: true });
  }
  throw new LockstepError(
    'LOCKSTEP_ERR_DATA_DIR_LOCKED',
    `could not lock ${file}: another ${owner} is starting`,
  );
}
