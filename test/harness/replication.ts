// Helpers for replication tests: agents that know each other, volume status as JSON, waiting
// for a peer state, comparing the copies' files.
import path from 'node:path';
import { AgentProcess, run } from './agent-process';
import { waitFor } from './processes';

export interface PeerJson {
  address: string;
  node: string;
  state: string;
  condition: string;
  dirtyBytes: number;
  resyncBytesSent: number;
  liveBytesSent: number;
}

export interface VolumeJson {
  name: string;
  role: string;
  readOnly: boolean;
  replication?: { mode: string; generation: string; primaryConnected: boolean; peers: PeerJson[] };
}

/** Agents with a short peer timeout, so failures are noticed within a test's patience. */
export function replicationAgent(node: string, extraArgs: string[] = []): AgentProcess {
  return new AgentProcess({ node, extraArgs: ['--peer-timeout', '1500', ...extraArgs] });
}

export async function volumeStatus(agent: AgentProcess, name: string): Promise<VolumeJson> {
  return JSON.parse(await agent.ctl('status', name, '-o', 'json')) as VolumeJson;
}

export async function peerOf(
  agent: AgentProcess,
  name: string,
  peer: AgentProcess,
): Promise<PeerJson> {
  const v = await volumeStatus(agent, name);
  const p = v.replication?.peers.find((x) => x.address === peer.grpcAddress);
  if (!p) throw new Error(`${peer.grpcAddress} is not a peer of ${name} on ${agent.node}`);
  return p;
}

export function waitPeer(
  agent: AgentProcess,
  name: string,
  peer: AgentProcess,
  ok: (p: PeerJson) => boolean,
  what: string,
  timeoutMs = 60_000,
  intervalMs = 100,
): Promise<PeerJson> {
  return waitFor(
    `${peer.node} ${what} on ${agent.node}`,
    async () => {
      const p = await peerOf(agent, name, peer);
      return ok(p) ? p : undefined;
    },
    timeoutMs,
    intervalMs,
  );
}

export const inSync = (p: PeerJson) => p.state === 'InSync' && p.dirtyBytes === 0;

export function dataFile(agent: AgentProcess, name: string): string {
  return path.join(agent.dataDir, 'volumes', name, 'data.img');
}

/** qemu-img compare of two copies' files; rejects with the first difference. */
export function expectIdentical(a: AgentProcess, b: AgentProcess, name: string): Promise<void> {
  return expectSameFiles(dataFile(a, name), dataFile(b, name));
}

export async function expectSameFiles(a: string, b: string): Promise<void> {
  const out = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  if (!out.includes('Images are identical')) throw new Error(out);
}
