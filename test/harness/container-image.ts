// The product's container image, built by scripts/image.sh, and containers run from it by
// Debian's runc (no container engine): a bundle unpacked by umoci, with the settings a pod
// would give it — the image's user, a read-only root, no capabilities — plus the host paths
// it is handed, mounted at the same paths so that files and sockets are named alike inside
// and out.
import { execFile } from 'node:child_process';
import { chownSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot, packageVersion } from '../../lib/package-root';
import { startProcess, type ManagedProcess } from './processes';

const execFileAsync = promisify(execFile);

export interface BuiltImage {
  /** The OCI layout directory. */
  layout: string;
  /** The same image as an OCI archive (what `ctr images import` takes). */
  archive: string;
  tag: string;
  digest: string;
}

/** Builds lockstep:<version> into `outDir` (from the built dist/). */
export async function buildImage(outDir: string): Promise<BuiltImage> {
  const { stdout } = await execFileAsync('bash', [path.join(packageRoot, 'scripts', 'image.sh')], {
    env: { ...process.env, LOCKSTEP_IMAGE_OUT: outDir },
    maxBuffer: 16 << 20,
    timeout: 600_000,
  });
  return {
    layout: path.join(outDir, 'oci'),
    archive: path.join(outDir, `lockstep-${packageVersion}.oci.tar`),
    tag: packageVersion,
    digest: stdout.trim(),
  };
}

/** The uid the image runs as. */
export const IMAGE_UID = 65532;

export interface ContainerOptions {
  /** Arguments after the image's entrypoint (`lockstep`). */
  args: string[];
  /** Host directories mounted read-write at the same path (made the image user's). */
  writable?: string[];
  /** Host directories mounted read-only at the same path (made readable by the image user). */
  readOnly?: string[];
}

interface RuntimeConfig {
  process: {
    args: string[];
    terminal: boolean;
    capabilities: Record<string, string[]>;
  };
  root: { path: string; readonly?: boolean };
  mounts: { destination: string; type: string; source: string; options: string[] }[];
  linux: { namespaces: { type: string }[] };
}

let containers = 0;

/**
 * One container: runc runs it in the foreground, in the host's network namespace (the tests
 * reach its ports on loopback) and its own pid, mount, ipc and uts namespaces.
 */
export class Container {
  readonly id = `lockstep-test-${process.pid}-${++containers}`;
  proc!: ManagedProcess;
  private readonly bundle: string;

  private constructor(bundle: string) {
    this.bundle = bundle;
  }

  static async create(image: BuiltImage, opts: ContainerOptions): Promise<Container> {
    const bundle = path.join(mkdtempSync(path.join(os.tmpdir(), 'lockstep-bundle-')), 'b');
    await execFileAsync('umoci', ['unpack', '--image', `${image.layout}:${image.tag}`, bundle]);
    const configPath = path.join(bundle, 'config.json');
    const config = JSON.parse(readFileSync(configPath, 'utf8')) as RuntimeConfig;
    config.process.terminal = false;
    config.process.args.push(...opts.args);
    config.process.capabilities = Object.fromEntries(
      Object.keys(config.process.capabilities).map((set) => [set, []]),
    );
    config.root.readonly = true;
    config.linux.namespaces = config.linux.namespaces.filter((ns) => ns.type !== 'network');
    const bind = (dir: string, mode: 'rw' | 'ro') =>
      config.mounts.push({ destination: dir, type: 'bind', source: dir, options: ['rbind', mode] });
    for (const dir of opts.writable ?? []) {
      chownSync(dir, IMAGE_UID, IMAGE_UID);
      bind(dir, 'rw');
    }
    for (const dir of opts.readOnly ?? []) {
      chownTree(dir, IMAGE_UID);
      bind(dir, 'ro');
    }
    writeFileSync(configPath, JSON.stringify(config));
    return new Container(bundle);
  }

  /** Starts it; its output goes to `logPath`. */
  start(logPath: string): this {
    this.proc = startProcess(this.id, 'runc', ['run', '--bundle', this.bundle, this.id], logPath);
    return this;
  }

  /** Runs a command inside it, as the image's user; resolves with its exit code and output. */
  async exec(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      const { stdout, stderr } = await execFileAsync('runc', ['exec', this.id, ...args]);
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
    }
  }

  /** The host pid of its first process. */
  async pid(): Promise<number> {
    const { stdout } = await execFileAsync('runc', ['state', this.id]);
    return (JSON.parse(stdout) as { pid: number }).pid;
  }

  /** Kills every process in it (runc's own process only waits for them) and removes it. */
  async dispose(): Promise<void> {
    await execFileAsync('runc', ['delete', '--force', this.id]).catch(() => undefined);
    await this.proc?.kill('SIGKILL');
    rmSync(path.dirname(this.bundle), { recursive: true, force: true });
  }
}

function chownTree(dir: string, uid: number): void {
  chownSync(dir, uid, uid);
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) chownTree(p, uid);
    else chownSync(p, uid, uid);
  }
}
