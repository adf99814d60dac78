// A real Kubernetes node on this machine: the kubelet built from the same Kubernetes module as
// the control plane, with Debian's containerd and runc running its pods and the CNI bridge
// plugin wiring them to the node's network namespace (node-network.ts).
//
// Each node has a mount namespace of its own, held open by a bind mount on a file, that
// containerd and the kubelet both run in. In it, the host paths a chart mounts into pods
// (`ownPaths`) are bind-mounted from the node's directory, so two nodes on one machine do not
// share their "host" directories, and the test reads each node's copy where it really is
// (`hostPath`). The pods' own mounts (rootfs, projected tokens) live in that namespace too, and
// go with it.
//
// What the sandbox here demands, each found by trying: no image can be pulled, so the sandbox
// (pause) image and the product's are imported; containerd may not lower oom_score_adj
// (`restrict_oom_score_adj`); cgroups are v1 (`failCgroupV1: false`, no per-QoS cgroups).
import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { NetworkNode } from './node-network';
import { startProcess, waitFor, type ManagedProcess } from './processes';
import { testTool } from './test-tools';

const execFileAsync = promisify(execFile);

/** The sandbox image containerd is told to use (imported, never pulled). */
export const PAUSE_IMAGE = 'registry.k8s.io/pause:3.10';

export interface KubeletNodeOptions {
  network: NetworkNode;
  /** Where the node keeps everything: containerd's and the kubelet's state, logs, its paths. */
  dir: string;
  /** A kubeconfig for the kubelet, naming the apiserver by an address the node reaches. */
  kubeconfig: string;
  /** Host directories the node has a copy of its own of (they must exist on the host). */
  ownPaths: string[];
}

export class KubeletNode {
  readonly name: string;
  readonly processes: ManagedProcess[] = [];
  private readonly socket: string;
  private readonly runcRoot: string;
  private readonly mountNs: string;

  private constructor(private readonly opts: KubeletNodeOptions) {
    this.name = opts.network.name;
    this.socket = path.join(opts.dir, 'containerd.sock');
    this.runcRoot = path.join(opts.dir, 'runc');
    this.mountNs = path.join(opts.dir, 'mnt-ns');
  }

  /** Starts containerd, imports `images` (OCI archives: [archive, name]) and the kubelet. */
  static async start(
    opts: KubeletNodeOptions,
    images: Array<[archive: string, name: string]>,
  ): Promise<KubeletNode> {
    const node = new KubeletNode(opts);
    try {
      node.enterMountNamespace();
      node.writeConfig();
      node.processes.push(
        node.inNode('containerd', 'containerd', [
          '--config',
          path.join(opts.dir, 'containerd.toml'),
        ]),
      );
      await waitFor(
        `containerd of ${node.name}`,
        () => {
          node.assertRunning();
          return node.ctr('version').then(
            () => true,
            () => undefined,
          );
        },
        30_000,
        100,
      );
      for (const [archive, name] of images) await node.importImage(archive, name);
      node.processes.push(
        node.inNode('kubelet', testTool('kubelet'), [
          `--kubeconfig=${opts.kubeconfig}`,
          `--config=${path.join(opts.dir, 'kubelet.yaml')}`,
          `--root-dir=${path.join(opts.dir, 'kubelet')}`,
          `--hostname-override=${node.name}`,
          `--node-ip=${opts.network.ip}`,
          '--v=1',
        ]),
      );
      return node;
    } catch (err) {
      await node.stop();
      throw err;
    }
  }

  /** Where the node's copy of `p` (a path under one of its own paths) is on the host. */
  hostPath(p: string): string {
    const i = this.opts.ownPaths.findIndex((own) => p === own || p.startsWith(own + '/'));
    if (i < 0) throw new Error(`${p} is not under a path ${this.name} has its own copy of`);
    return path.join(this.opts.dir, 'paths', String(i), path.relative(this.opts.ownPaths[i], p));
  }

  /** Imports an OCI archive into containerd's Kubernetes namespace as `name` (repo:tag). */
  async importImage(archive: string, name: string): Promise<void> {
    await this.ctr('images', 'import', '--base-name', fullRepository(name), archive);
  }

  /** The ids of the containers (sandboxes included) running on the node. */
  async runningContainers(): Promise<string[]> {
    return (await this.containers()).filter((c) => c.status === 'running').map((c) => c.id);
  }

  /** The host pid of a container's first process. */
  async containerPid(id: string): Promise<number> {
    const { stdout } = await execFileAsync('runc', ['--root', this.runcK8s, 'state', id]);
    return (JSON.parse(stdout) as { pid: number }).pid;
  }

  assertRunning(): void {
    for (const p of this.processes)
      if (p.child.exitCode !== null || p.child.signalCode !== null)
        throw new Error(`${p.name} of ${this.name} exited:\n${p.log().slice(-3000)}`);
  }

  /**
   * Stops the node as a machine going down: the kubelet and every container are killed, then
   * containerd and its shims; the mount namespace (and every mount the pods had) goes with
   * its last process.
   */
  async stop(): Promise<void> {
    const kubelet = this.processes.find((p) => p.name.startsWith('kubelet'));
    await kubelet?.kill('SIGKILL');
    for (const { id } of await this.containers().catch(() => []))
      await execFileAsync('runc', ['--root', this.runcK8s, 'delete', '--force', id]).catch(
        () => undefined,
      );
    for (const p of this.processes) await p.kill('SIGKILL');
    // Shims outlive containerd by design; these are this node's (their address is its socket).
    await execFileAsync('pkill', [
      '-KILL',
      '-f',
      `containerd-shim-runc-v2 .*-address ${this.socket}`,
    ]).catch(() => undefined);
    try {
      execFileSync('umount', [this.mountNs], { stdio: 'ignore' });
    } catch {
      // never made
    }
  }

  /** Every container runc knows on the node, running or not. */
  private async containers(): Promise<Array<{ id: string; status: string }>> {
    const { stdout } = await execFileAsync('runc', [
      '--root',
      this.runcK8s,
      'list',
      '--format',
      'json',
    ]);
    return (JSON.parse(stdout) as Array<{ id: string; status: string }> | null) ?? [];
  }

  private get runcK8s(): string {
    return path.join(this.runcRoot, 'k8s.io');
  }

  private async ctr(...args: string[]): Promise<void> {
    await execFileAsync(
      'nsenter',
      [`--mount=${this.mountNs}`, 'ctr', '-a', this.socket, '-n', 'k8s.io', ...args],
      {
        maxBuffer: 16 << 20,
      },
    );
  }

  /** A process in the node's network and mount namespaces. */
  private inNode(name: string, command: string, args: string[]): ManagedProcess {
    return startProcess(
      `${name} (${this.name})`,
      'nsenter',
      [`--net=/run/netns/${this.opts.network.netns}`, `--mount=${this.mountNs}`, command, ...args],
      path.join(this.opts.dir, `${name}.log`),
    );
  }

  /**
   * Makes the node's mount namespace: its own copy of each of `ownPaths`, and shared
   * propagation inside it (the kubelet's HostToContainer mounts need it), private to the host.
   */
  private enterMountNamespace(): void {
    writeFileSync(this.mountNs, '');
    const binds = this.opts.ownPaths.map((p, i) => {
      const own = path.join(this.opts.dir, 'paths', String(i));
      mkdirSync(own, { recursive: true });
      return `mount --bind '${own}' '${p}'`;
    });
    execFileSync(
      'unshare',
      [
        `--mount=${this.mountNs}`,
        '--propagation',
        'private',
        'sh',
        '-ec',
        ['mount --make-rshared /', ...binds].join('\n'),
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
  }

  private writeConfig(): void {
    const { dir, network } = this.opts;
    const cniDir = path.join(dir, 'cni');
    mkdirSync(cniDir, { recursive: true });
    writeFileSync(
      path.join(cniDir, '10-bridge.conflist'),
      JSON.stringify({
        cniVersion: '0.4.0',
        name: 'lockstep-test',
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            ipam: {
              type: 'host-local',
              ranges: [[{ subnet: network.podCidr }]],
              routes: [{ dst: '0.0.0.0/0' }],
              dataDir: path.join(dir, 'cni-ipam'),
            },
          },
        ],
      }),
    );
    const cri = 'plugins."io.containerd.grpc.v1.cri"';
    writeFileSync(
      path.join(dir, 'containerd.toml'),
      [
        'version = 2',
        `root = "${dir}/containerd/root"`,
        `state = "${dir}/containerd/state"`,
        '[grpc]',
        `  address = "${this.socket}"`,
        '[ttrpc]',
        `  address = "${this.socket}.ttrpc"`,
        '[plugins."io.containerd.internal.v1.opt"]',
        `  path = "${dir}/containerd/opt"`,
        `[${cri}]`,
        `  sandbox_image = "${PAUSE_IMAGE}"`,
        // The sandbox may not lower a process's oom_score_adj (no CAP_SYS_RESOURCE): runc
        // fails every container with "can't get final child's PID from pipe" otherwise.
        '  restrict_oom_score_adj = true',
        '  netns_mounts_under_state_dir = true',
        `[${cri}.cni]`,
        '  bin_dir = "/usr/lib/cni"',
        `  conf_dir = "${cniDir}"`,
        `[${cri}.containerd.runtimes.runc]`,
        '  runtime_type = "io.containerd.runc.v2"',
        `[${cri}.containerd.runtimes.runc.options]`,
        `  Root = "${this.runcRoot}"`,
        '',
      ].join('\n'),
    );
    writeFileSync(
      path.join(dir, 'kubelet.yaml'),
      JSON.stringify({
        apiVersion: 'kubelet.config.k8s.io/v1beta1',
        kind: 'KubeletConfiguration',
        // The machines here have cgroup v1, which kubelet 1.34 refuses unless told.
        failCgroupV1: false,
        cgroupDriver: 'cgroupfs',
        cgroupsPerQOS: false,
        enforceNodeAllocatable: [],
        failSwapOn: false,
        address: network.ip,
        healthzBindAddress: '127.0.0.1',
        readOnlyPort: 0,
        containerRuntimeEndpoint: `unix://${this.socket}`,
        podCIDR: network.podCidr,
        podLogsDir: path.join(dir, 'pod-logs'),
        // The apiserver reaches it for logs and exec with no client certificate.
        authentication: { anonymous: { enabled: true }, webhook: { enabled: false } },
        authorization: { mode: 'AlwaysAllow' },
        // The machine's disk and memory are the test's, not the node's: never evict.
        evictionHard: {
          'memory.available': '0%',
          'nodefs.available': '0%',
          'imagefs.available': '0%',
        },
        imageGCHighThresholdPercent: 100,
        imageGCLowThresholdPercent: 99,
        localStorageCapacityIsolation: false,
      }),
    );
  }
}

/**
 * The repository of `name` (repo:tag) as the kubelet asks containerd for it: `lockstep` is
 * docker.io/library/lockstep, as in a pod spec.
 */
function fullRepository(name: string): string {
  const repository = name.slice(0, name.lastIndexOf(':'));
  const [first, ...rest] = repository.split('/');
  if (rest.length && (first.includes('.') || first.includes(':') || first === 'localhost'))
    return repository;
  return `docker.io/${rest.length ? '' : 'library/'}${repository}`;
}
