// Clients that follow a primary as it moves (follow_writer.py), and what a move test or bench
// counts around them: the writes they had acknowledged, and the bytes a replica received.
import { adminTransport } from './test-certificates';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { AgentClient } from '../../lib/agent-client';
import { repoRoot, systemPython } from './agent-process';
import { startProcess, type ManagedProcess } from './processes';

export interface FollowWriterSummary {
  acked: number;
  failed: number;
  reconnects: number;
  resent: number;
  errors: string[];
}

/** Writes through whichever of `uris` takes writes until `stop` exists; logs acked slots. */
export function startFollowWriter(
  name: string,
  uris: string[],
  ackedLog: string,
  stop: string,
  depth = 8,
  /** Within the first `span` 4 KiB slots (0: the whole volume), written over and over if `cycle`. */
  span = 0,
  cycle = false,
): ManagedProcess {
  return startProcess(
    name,
    systemPython,
    [
      path.join(repoRoot, 'test', 'harness', 'follow_writer.py'),
      uris.join(','),
      ackedLog,
      stop,
      String(depth),
      String(span),
      ...(cycle ? ['cycle'] : []),
    ],
    `${ackedLog}.writer.log`,
  );
}

/** Its summary once it exited; throws with its output if it failed. */
export async function followWriterSummary(w: ManagedProcess): Promise<FollowWriterSummary> {
  const exit = await w.exited;
  if (exit !== 0) throw new Error(`${w.name} exited with ${exit}:\n${w.log()}`);
  return JSON.parse(w.log().trim().split('\n').at(-1) ?? '') as FollowWriterSummary;
}

/** How many writes the log says were acknowledged so far. */
export function ackedCount(log: string): number {
  try {
    return readFileSync(log, 'utf8').split('\n').filter(Boolean).length;
  } catch {
    return 0;
  }
}

/** Write bytes a copy took from primaries; asked in-process, to be read within a millisecond. */
export async function receivedBytes(address: string, volumes: string[]): Promise<number> {
  const client = new AgentClient(address, adminTransport());
  try {
    const vols = await Promise.all(volumes.map((v) => client.getVolume(v)));
    return vols.reduce((n, v) => n + Number(v.replication?.receivedBytes ?? 0), 0);
  } finally {
    client.close();
  }
}
