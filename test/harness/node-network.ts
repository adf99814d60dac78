// A flat network for nodes of their own on one machine, as a cluster's nodes and pods see
// theirs: a bridge on the host (the host's address on it is where the control plane serves)
// and, per node, a network namespace joined to the bridge by a veth pair, with a pod range of
// its own routed to it from the host and from every other node. A pod on one node reaches the
// apiserver and the pods of every other node; nothing leaves the machine. Needs root.
import { execFileSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export interface NetworkNode {
  name: string;
  /** The node's network namespace (under /run/netns). */
  netns: string;
  /** The node's address on the bridge. */
  ip: string;
  /** The range its pods get addresses from. */
  podCidr: string;
}

export class NodeNetwork {
  private constructor(
    private readonly bridge: string,
    /** The host's address on the bridge. */
    readonly hostIp: string,
    readonly nodes: NetworkNode[],
  ) {}

  /** Room for this many nodes: each takes the /24 after the bridge's. */
  static readonly MAX_NODES = 3;

  static create(names: string[]): NodeNetwork {
    if (names.length > NodeNetwork.MAX_NODES)
      throw new Error(`at most ${NodeNetwork.MAX_NODES} nodes`);
    const id = randomBytes(4).toString('hex');
    // Four /24s of 172.16.0.0/12 picked at random (the bridge's, then one per node's pods), so
    // that tests running side by side, and the 10.x ranges the partition tests use, never meet.
    const b = randomInt(16, 32);
    const c = randomInt(0, 64) * 4;
    const net = new NodeNetwork(
      `lsb${id}`,
      `172.${b}.${c}.1`,
      names.map((name, i) => ({
        name,
        netns: `lsk-${id}-${i}`,
        ip: `172.${b}.${c}.${i + 2}`,
        podCidr: `172.${b}.${c + i + 1}.0/24`,
      })),
    );
    try {
      ip('link', 'add', net.bridge, 'type', 'bridge');
      ip('addr', 'add', `${net.hostIp}/24`, 'dev', net.bridge);
      ip('link', 'set', net.bridge, 'up');
      net.nodes.forEach((node, i) => {
        const outer = `lsv${id}${i}`;
        const inner = `lsn${id}${i}`;
        ip('netns', 'add', node.netns);
        ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
        ip('link', 'set', outer, 'master', net.bridge, 'up');
        ip('link', 'set', inner, 'netns', node.netns);
        ip('-n', node.netns, 'addr', 'add', `${node.ip}/24`, 'dev', inner);
        ip('-n', node.netns, 'link', 'set', inner, 'up');
        ip('-n', node.netns, 'link', 'set', 'lo', 'up');
        ip('-n', node.netns, 'route', 'add', 'default', 'via', net.hostIp);
        // The node routes between its pods' bridge and the network, as a node does.
        execFileSync('ip', ['netns', 'exec', node.netns, 'sysctl', '-qw', 'net.ipv4.ip_forward=1']);
        // Replies to pods (the apiserver's, for one) find their way back.
        ip('route', 'add', node.podCidr, 'via', node.ip);
      });
      for (const node of net.nodes)
        for (const other of net.nodes)
          if (other !== node) ip('-n', node.netns, 'route', 'add', other.podCidr, 'via', other.ip);
    } catch (err) {
      net.dispose();
      throw err;
    }
    return net;
  }

  node(name: string): NetworkNode {
    const node = this.nodes.find((n) => n.name === name);
    if (!node) throw new Error(`no node ${name} on this network`);
    return node;
  }

  /**
   * Removes the namespaces and the bridge; the host's routes to the pods go with it. Processes
   * inside must be gone first.
   */
  dispose(): void {
    for (const node of this.nodes) {
      try {
        ip('netns', 'del', node.netns);
      } catch {
        // never made, or already gone
      }
    }
    try {
      ip('link', 'del', this.bridge);
    } catch {
      // never made
    }
  }
}
