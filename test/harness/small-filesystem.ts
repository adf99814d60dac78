// A small, real ext4 filesystem on a loop device, for tests that need a disk to fill up: the
// agents' ENOSPC paths (and their direct I/O) run against the kernel, not a fake. A ballast
// file takes most of the space; dropping it is "the operator freed space". Needs root, as the
// test machines and CI have.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const MiB = 1024 * 1024;

export class SmallFilesystem {
  private constructor(
    private readonly dir: string,
    /** Where the filesystem is mounted: give it to an agent as its data dir. */
    readonly mountPoint: string,
  ) {}

  /** Formats and mounts `sizeMiB` of ext4, with `ballastMiB` of it taken by a ballast file. */
  static create(sizeMiB: number, ballastMiB: number): SmallFilesystem {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'lockstep-smallfs-'));
    const image = path.join(dir, 'fs.img');
    const mountPoint = path.join(dir, 'mnt');
    execFileSync('truncate', ['-s', `${sizeMiB}M`, image]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
    execFileSync('mkdir', [mountPoint]);
    execFileSync('mount', ['-o', 'loop', image, mountPoint]);
    const fs = new SmallFilesystem(dir, mountPoint);
    if (ballastMiB > 0) {
      // Written, not just sized: a sparse ballast would take no space.
      writeFileSync(path.join(mountPoint, 'ballast'), Buffer.alloc(ballastMiB * MiB, 0x42));
      execFileSync('sync', ['-f', mountPoint]);
    }
    return fs;
  }

  freeBytes(): number {
    const s = statfsSync(this.mountPoint);
    return s.bavail * s.bsize;
  }

  /** Frees the space the ballast held. */
  dropBallast(): void {
    rmSync(path.join(this.mountPoint, 'ballast'), { force: true });
    execFileSync('sync', ['-f', this.mountPoint]);
  }

  /** Unmounts (lazily, should a process still hold a file) and removes everything. */
  dispose(): void {
    try {
      execFileSync('umount', ['-l', this.mountPoint]);
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}
