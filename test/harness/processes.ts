// Child processes for tests: output goes to a log file (shown when a test fails to start
// something), and every process is killed when its owner stops, SIGTERM first, then SIGKILL.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { createWriteStream, readFileSync } from 'node:fs';
import net from 'node:net';

export interface ManagedProcess {
  name: string;
  child: ChildProcess;
  logPath: string;
  /** Resolves with the exit code (or signal name) once the process has exited. */
  exited: Promise<number | string>;
  stop(graceMs?: number): Promise<void>;
  kill(signal?: NodeJS.Signals): Promise<void>;
  log(): string;
}

export function startProcess(
  name: string,
  command: string,
  args: string[],
  logPath: string,
  env: NodeJS.ProcessEnv = process.env,
): ManagedProcess {
  const out = createWriteStream(logPath, { flags: 'a' });
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.pipe(out, { end: false });
  child.stderr.pipe(out, { end: false });
  const exited = new Promise<number | string>((resolve) => {
    child.once('exit', (code, signal) => resolve(code ?? signal ?? -1));
    child.once('error', (err) => {
      out.write(`spawn error: ${err.message}\n`);
      resolve(-1);
    });
  });
  void exited.then(() => out.end());
  const kill = async (signal: NodeJS.Signals = 'SIGKILL') => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    if (signal === 'SIGKILL') await reaped(name, child, exited);
    else await exited;
  };
  return {
    name,
    child,
    logPath,
    exited,
    kill,
    async stop(graceMs = 5000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      await within(exited, graceMs);
      await kill('SIGKILL');
    },
    log: () => {
      try {
        return readFileSync(logPath, 'utf8');
      } catch {
        return '';
      }
    },
  };
}

/** Whether `p` settles within `ms`. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(resolve, ms, false)));
  try {
    return await Promise.race([p.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}
/** Time a SIGKILLed process gets to be gone: only a process stuck in the kernel takes longer. */
const REAP_MS = 10_000;

/**
 * Waits for a SIGKILLed process to exit. One stuck in the kernel (uninterruptible I/O) would
 * keep its pipes, and with them the test run, open forever: it is reported with where it is
 * stuck, and let go.
 */
async function reaped(
  name: string,
  child: ChildProcess,
  exited: Promise<number | string>,
): Promise<void> {
  if (await within(exited, REAP_MS)) return;
  const proc = (file: string) => {
    try {
      return readFileSync(`/proc/${child.pid}/${file}`, 'utf8').trim();
    } catch {
      return '?';
    }
  };
  const state = /^State:\s*(.*)$/m.exec(proc('status'))?.[1] ?? '?';
  process.stderr.write(
    `${name} (pid ${child.pid}) has not exited ${REAP_MS} ms after SIGKILL: state ${state}, ` +
      `waiting in ${proc('wchan')}; letting it go\n`,
  );
  child.stdout?.destroy();
  child.stderr?.destroy();
  child.unref();
}

/** A loopback TCP port that was free a moment ago. */
/**
 * The first port the kernel hands to outgoing connections and to listen(0): ports below it are
 * never taken behind our back, so an agent restarted on its old port finds it free.
 */
function ephemeralStart(): number {
  try {
    return Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').split(/\s+/)[0]);
  } catch {
    return 32_768;
  }
}
const PORT_LOW = 10_000;
const PORT_HIGH = Math.max(PORT_LOW + 1_000, ephemeralStart());
const handedOut = new Set<number>();

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/**
 * A port for a server a test starts (and may restart on the same port): random, below the
 * ephemeral range, free now and not handed out before by this process.
 */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = randomInt(PORT_LOW, PORT_HIGH);
    if (handedOut.has(port) || !(await bindable(port))) continue;
    handedOut.add(port);
    return port;
  }
  throw new Error(`no free port between ${PORT_LOW} and ${PORT_HIGH}`);
}

/** Polls `check` until it returns a value, or fails with the last error after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined>,
  timeoutMs: number,
  intervalMs = 100,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const why = last instanceof Error ? `: ${last.message}` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${why}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
