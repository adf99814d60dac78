// A real `lockstep agent` process for tests: its own data dir, free ports, logs in a file.
// Restartable on the same data dir, killable with any signal.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentClient } from '../../lib/agent-client';
import { packageRoot } from '../../lib/package-root';
import { freePort, startProcess, waitFor, type ManagedProcess } from './processes';
import type { NetNamespace } from './netns';
import { productNode } from './product-runtime';
import { PLAINTEXT, type Transport } from '../../lib/tls/transport';
import { adminTransport, tlsDirFor } from './test-certificates';

export const ADMIN = { role: 'admin', name: 'admin' } as const;

const execFileAsync = promisify(execFile);
export const repoRoot = packageRoot;
export const lockstepBin = path.join(repoRoot, 'bin', 'lockstep.js');

export interface AgentProcessOptions {
  node?: string;
  dataDir?: string;
  /** Where its logs go (default: the data dir; elsewhere when that disk is meant to fill up). */
  logDir?: string;
  nbdTcp?: boolean;
  metrics?: boolean;
  extraArgs?: string[];
  /** The address it listens on (default 127.0.0.1). */
  host?: string;
  /** Runs it inside this network namespace (then `host` is its address there). */
  netns?: NetNamespace;
  /** Plaintext (--insecure) instead of mutual TLS with the test CA. */
  insecure?: boolean;
  /**
   * Mutual TLS with certificates from elsewhere (a cluster's operator): the agent's transport
   * flags, and the administrator's transport the test's clients use.
   */
  tls?: { args: string[]; admin: () => Transport };
}

export class AgentProcess {
  proc!: ManagedProcess;
  grpcAddress = '';
  nbdTcpPort = 0;
  metricsPort = 0;
  readonly node: string;
  readonly dataDir: string;
  private readonly ownsDir: boolean;
  private starts = 0;

  constructor(private readonly opts: AgentProcessOptions = {}) {
    this.node = opts.node ?? 'node-a';
    this.ownsDir = !opts.dataDir;
    this.dataDir = opts.dataDir ?? mkdtempSync(path.join(os.tmpdir(), 'lockstep-agent-'));
  }

  get nbdSocket(): string {
    return path.join(this.dataDir, 'nbd.sock');
  }

  uri(volume: string): string {
    return `nbd+unix:///${volume}?socket=${this.nbdSocket}`;
  }

  async start(): Promise<this> {
    const port = this.grpcAddress ? Number(this.grpcAddress.split(':')[1]) : await freePort();
    this.grpcAddress = `${this.opts.host ?? '127.0.0.1'}:${port}`;
    const args = [
      lockstepBin,
      'agent',
      '--node',
      this.node,
      '--data-dir',
      this.dataDir,
      '--listen',
      this.grpcAddress,
    ];
    if (this.opts.nbdTcp) {
      this.nbdTcpPort ||= await freePort();
      args.push('--nbd-listen', `127.0.0.1:${this.nbdTcpPort}`);
    }
    if (this.opts.metrics) {
      this.metricsPort ||= await freePort();
      args.push('--metrics-listen', `127.0.0.1:${this.metricsPort}`);
    }
    args.push(...(await this.transportArgs()));
    args.push(...(this.opts.extraArgs ?? []));
    const [command, argv] = this.opts.netns
      ? this.opts.netns.wrap(productNode(), args)
      : [productNode(), args];
    this.proc = startProcess(
      `agent-${this.node}`,
      command,
      argv,
      path.join(this.opts.logDir ?? this.dataDir, `agent.${this.node}.${++this.starts}.log`),
    );
    const up = await waitFor(
      `agent ${this.node} to serve`,
      async () => {
        // Returned, not thrown: waitFor retries what throws.
        if (this.proc.child.exitCode !== null) return 'exited';
        const client = this.client(1000);
        try {
          // Its API answers while volumes resume; their exports are open only once serving.
          return (await client.info()).serving ? 'serving' : undefined;
        } finally {
          client.close();
        }
      },
      20_000,
      50,
    );
    if (up === 'exited') throw new Error(`agent exited:\n${this.proc.log()}`);
    return this;
  }

  /** --tls-dir with a certificate for its node, or --insecure. */
  private async transportArgs(): Promise<string[]> {
    if (this.opts.insecure) return ['--insecure'];
    if (this.opts.tls) return this.opts.tls.args;
    return ['--tls-dir', await tlsDirFor({ role: 'agent', name: this.node })];
  }

  /** The transport a client of this agent uses: an administrator's certificate, or plaintext. */
  get transport(): Transport {
    if (this.opts.tls) return this.opts.tls.admin();
    return this.opts.insecure ? PLAINTEXT : adminTransport();
  }

  /** A control-API client, as an administrator. */
  client(timeoutMs?: number): AgentClient {
    return new AgentClient(this.grpcAddress, this.transport, timeoutMs);
  }

  /** Everything it logged, over all its runs. */
  logs(): string {
    const dir = this.opts.logDir ?? this.dataDir;
    return readdirSync(dir)
      .filter((f) => f.startsWith(`agent.${this.node}.`) && f.endsWith('.log'))
      .map((f) => readFileSync(path.join(dir, f), 'utf8'))
      .join('');
  }

  private async ctlTransportArgs(): Promise<string[]> {
    if (this.opts.insecure) return ['--insecure'];
    if (this.opts.tls) return ['--tls-dir', this.transport.secure ? this.transport.dir.dir : ''];
    return ['--tls-dir', await tlsDirFor(ADMIN)];
  }

  /** Runs `lockstep ctl --agent <this> ...args` and returns stdout; rejects with stderr on failure. */
  async ctl(...args: string[]): Promise<string> {
    try {
      const { stdout } = await execFileAsync(productNode(), [
        lockstepBin,
        'ctl',
        '--agent',
        this.grpcAddress,
        ...(await this.ctlTransportArgs()),
        ...args,
      ]);
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; code?: number };
      throw Object.assign(
        new Error(`ctl ${args.join(' ')} failed (${e.code}): ${e.stderr ?? ''}`),
        { stderr: e.stderr ?? '', exitCode: e.code },
      );
    }
  }

  async createVolume(name: string, size: string): Promise<string> {
    await this.ctl('volume', 'create', name, '--size', size);
    return this.uri(name);
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<number | string> {
    await this.proc.kill(signal);
    return this.proc.exited;
  }

  async stop(): Promise<void> {
    await this.proc?.stop();
  }

  async dispose(): Promise<void> {
    await this.proc?.kill('SIGKILL');
    // KEEP_AGENT_DIRS=1 keeps the data dirs (and the agents' logs in them) to debug a failure.
    if (this.ownsDir && !process.env.KEEP_AGENT_DIRS)
      rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** Runs a command (an NBD client) and returns stdout; the error carries stderr. */
export async function run(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; input?: string } = {},
): Promise<string> {
  try {
    const { stdout } = await execFileAsync(cmd, args, {
      timeout: opts.timeoutMs ?? 120_000,
      maxBuffer: 64 << 20,
    });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; code?: number };
    throw new Error(
      `${cmd} ${args.join(' ')} failed (${e.code}):\n${e.stderr ?? ''}${e.stdout ?? ''}`,
    );
  }
}

/** Debian's python3 (python3-libnbd lives in its dist-packages, not in other interpreters). */
export const systemPython = '/usr/bin/python3';

export const ackWriter = path.join(repoRoot, 'test', 'harness', 'ack_writer.py');

/** Starts the acknowledged-write recorder against `uri`; resolves with its summary line. */
export function startAckWriter(
  uri: string,
  logFile: string,
  count: number,
  depth = 16,
  /** Write only within the first `span` 4 KiB slots (0: the whole volume). */
  span = 0,
  /** A FLUSH after every `flushEvery` writes, and only flushed writes logged (0: no FLUSH). */
  flushEvery = 0,
): Promise<string> {
  const args = [
    ackWriter,
    'write',
    uri,
    logFile,
    String(count),
    String(depth),
    String(span),
    String(flushEvery),
  ];
  return run(systemPython, args, { timeoutMs: 300_000 });
}

/** Checks every acknowledged slot in `logFile`; resolves with how many distinct slots were checked. */
export async function verifyAckedWrites(uri: string, logFile: string): Promise<number> {
  const out = await run(systemPython, [ackWriter, 'verify', uri, logFile], { timeoutMs: 600_000 });
  const m = /checked=(\d+) bad=0/.exec(out);
  if (!m) throw new Error(`acknowledged writes missing: ${out}`);
  return Number(m[1]);
}

/** fio's nbd engine: 4k random writes at queue depth 16, then a crc32c verify pass. */
export function fioVerify(uri: string, size: string, extraArgs: string[] = []): Promise<string> {
  const args = [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    `--size=${size}`,
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0',
    ...extraArgs,
  ];
  return run('fio', args, { timeoutMs: 180_000 });
}
