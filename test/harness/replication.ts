// Helpers for replication tests: agents that know each other, volume status as JSON, waiting
// for a peer state, comparing the copies' files, and a proxy in front of every connection a
// primary makes to its replica (gRPC control and raw data lanes).
import path from 'node:path';
import { AgentProcess, run } from './agent-process';
import { freePort, waitFor } from './processes';
import { TcpProxy, type ProxyMode } from './tcp-proxy';

export interface PeerJson {
  address: string;
  node: string;
  state: string;
  reason: string;
  dirtyBytes: number;
  resyncBytesSent: number;
  liveBytesSent: number;
  /** Epoch ms when the peer last reached InSync, by the primary's clock. */
  lastInSyncMs: number;
  linkFailures: number;
}

export interface VolumeJson {
  name: string;
  role: string;
  readOnly: boolean;
  replication?: {
    mode: string;
    generation: string;
    primaryConnected: boolean;
    peers: PeerJson[];
    protection?: { mediator: string; group: string; epoch: number; state: string };
  };
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

export function metaFile(agent: AgentProcess, name: string): string {
  return path.join(agent.dataDir, 'volumes', name, 'meta.json');
}

/** qemu-img compare of two copies' files; rejects with the first difference. */
export function expectIdentical(a: AgentProcess, b: AgentProcess, name: string): Promise<void> {
  return expectSameImages(dataFile(a, name), dataFile(b, name));
}

/** qemu-img compare of two raw images: files, or NBD URIs (a snapshot's export, say). */
export async function expectSameImages(a: string, b: string): Promise<void> {
  const out = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  if (!out.includes('Images are identical')) throw new Error(out);
}

/**
 * A replica reached only through proxies: its gRPC address and its data port (which it
 * advertises as the proxy's), so breaking the link breaks the control calls and the data lanes.
 */
export class ProxiedReplica {
  private constructor(
    readonly agent: AgentProcess,
    readonly control: TcpProxy,
    readonly data: TcpProxy,
  ) {}

  /**
   * `advertiseProxy`: the agent names itself by the proxy's address too, so that whichever of
   * the two is primary, the other reaches it through the proxy (and the mediator knows it by
   * one name); otherwise only the way to it is proxied.
   */
  static async start(
    node: string,
    extraArgs: string[] = [],
    advertiseProxy = false,
  ): Promise<ProxiedReplica> {
    const dataPort = await freePort();
    const data = await TcpProxy.start(`127.0.0.1:${dataPort}`);
    const grpcAddress = `127.0.0.1:${await freePort()}`;
    const control = await TcpProxy.start(grpcAddress);
    const agent = replicationAgent(node, [
      '--data-listen',
      `127.0.0.1:${dataPort}`,
      '--data-advertise',
      data.address,
      ...(advertiseProxy ? ['--advertise', control.address] : []),
      ...extraArgs,
    ]);
    agent.grpcAddress = grpcAddress;
    await agent.start();
    return new ProxiedReplica(agent, control, data);
  }

  /** The address a primary replicates to. */
  get address(): string {
    return this.control.address;
  }

  /** Stands in for the agent where helpers look peers up by address. */
  get asPeer(): AgentProcess {
    return { grpcAddress: this.address, node: this.agent.node } as AgentProcess;
  }

  setMode(mode: ProxyMode): void {
    this.control.setMode(mode);
    this.data.setMode(mode);
  }

  setDelay(ms: number): void {
    this.control.setDelay(ms);
    this.data.setDelay(ms);
  }

  dropAll(): void {
    this.control.dropAll();
    this.data.dropAll();
  }

  get dataBytesForwarded(): number {
    return this.data.bytesForwarded;
  }

  async close(): Promise<void> {
    await this.control.close();
    await this.data.close();
  }
}
