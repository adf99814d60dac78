// Drives causal_writer.py: a writer whose writes to two volumes depend on each other (see the
// script), and a reader of the sequence numbers snapshots of them hold.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { repoRoot, run, systemPython } from './agent-process';

const script = path.join(repoRoot, 'test', 'harness', 'causal_writer.py');

export interface CausalWriter {
  /** Stops the writer; resolves with how many sequence numbers it wrote to both volumes. */
  stop(): Promise<number>;
  /** Kills it without waiting for a summary (cleanup). */
  kill(): void;
}

/** Starts the writer on two volumes' URIs; resolves once it is connected to both. */
export function startCausalWriter(uri1: string, uri2: string): Promise<CausalWriter> {
  const child = spawn(systemPython, [script, 'write', uri1, uri2], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | string>((resolve) =>
    child.once('exit', (code, signal) => resolve(code ?? signal ?? -1)),
  );
  const writer: CausalWriter = {
    async stop() {
      child.kill('SIGTERM');
      const code = await exited;
      const m = /^writes=(\d+)$/m.exec(out);
      if (code !== 0 || !m) throw new Error(`causal writer failed (${code}):\n${out}`);
      return Number(m[1]);
    },
    kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
  };
  return new Promise((resolve, reject) => {
    const onData = () => {
      if (!out.includes('connected')) return;
      child.stdout.off('data', onData);
      resolve(writer);
    };
    child.stdout.on('data', onData);
    void exited.then((code) => reject(new Error(`causal writer exited (${code}):\n${out}`)));
  });
}

/** The sequence number at offset 0 of each URI (a snapshot export), in order. */
export async function readSequences(uris: string[]): Promise<number[]> {
  if (uris.length === 0) return [];
  const out = await run(systemPython, [script, 'read', ...uris]);
  return out.trim().split('\n').map(Number);
}
