// A promise-based client of an agent's control API, with a deadline on every call and errors
// turned back into LockstepErrors. Used by `lockstep ctl` and the operator.
import type * as grpc from '@grpc/grpc-js';
import { agentProto, type AgentClient as RawAgentClient } from '../proto';
import { CLIENT_CHANNEL_OPTIONS, unaryCall, type Callback } from './grpc-errors';
import { channelCredentials, channelOptions, type Transport } from './tls/transport';
import type { GetInfoResponse__Output } from '../proto/gen/lockstep/v1/GetInfoResponse';
import type { GetStatusResponse__Output } from '../proto/gen/lockstep/v1/GetStatusResponse';
import type { Volume__Output } from '../proto/gen/lockstep/v1/Volume';
import type { PromoteResponse__Output } from '../proto/gen/lockstep/v1/PromoteResponse';
import type { Snapshot__Output } from '../proto/gen/lockstep/v1/Snapshot';
import type { Group__Output } from '../proto/gen/lockstep/v1/Group';
import type { GroupSnapshot__Output } from '../proto/gen/lockstep/v1/GroupSnapshot';
import type { VerifySnapshotResponse__Output } from '../proto/gen/lockstep/v1/VerifySnapshotResponse';

export type AgentInfo = GetInfoResponse__Output;
export type AgentStatus = GetStatusResponse__Output;
export type VolumeInfo = Volume__Output;
export type PromoteInfo = PromoteResponse__Output & { volume: VolumeInfo };
export type SnapshotInfo = Snapshot__Output;
export type GroupInfo = Group__Output;
export type GroupSnapshotInfo = GroupSnapshot__Output;
export type Verification = VerifySnapshotResponse__Output;

export class AgentClient {
  private readonly raw: RawAgentClient;

  constructor(
    readonly target: string,
    transport: Transport,
    private readonly timeoutMs = 10_000,
    /** The option that named `target`, for an error that cannot reach it. */
    private readonly flag = '--agent',
  ) {
    this.raw = new (agentProto().Agent)(target, channelCredentials(transport, ['agent']), {
      ...CLIENT_CHANNEL_OPTIONS,
      ...channelOptions(transport),
    });
  }

  private call<Res>(
    invoke: (options: grpc.CallOptions, cb: Callback<Res>) => unknown,
    timeoutMs = this.timeoutMs,
  ): Promise<Res> {
    return unaryCall({ target: this.target, kind: 'agent', flag: this.flag }, timeoutMs, invoke);
  }

  info(): Promise<AgentInfo> {
    return this.call<AgentInfo>((o, cb) => this.raw.GetInfo({}, o, cb));
  }

  status(): Promise<AgentStatus> {
    return this.call<AgentStatus>((o, cb) => this.raw.GetStatus({}, o, cb));
  }

  async listVolumes(): Promise<VolumeInfo[]> {
    return (await this.call<{ volumes: VolumeInfo[] }>((o, cb) => this.raw.ListVolumes({}, o, cb)))
      .volumes;
  }

  createVolume(
    name: string,
    sizeBytes: number,
    options: {
      readOnly?: boolean;
      dataPath?: string;
      secondaryOfUuid?: string;
      members?: string[];
    } = {},
  ): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) =>
      this.raw.CreateVolume({ name, sizeBytes, ...options }, o, cb),
    );
  }

  getVolume(name: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.GetVolume({ name }, o, cb));
  }

  replicate(req: {
    name: string;
    targets: string[];
    mode: string;
    regionSize: number;
    maxResyncBytesPerSecond: number;
    replaceTargets?: boolean;
    mediator?: {
      address: string;
      group?: string;
      failover?: string;
      graceMs?: number;
      suspendLimitMs?: number;
    };
  }): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.Replicate(req, o, cb));
  }

  /** See the Agent service's SetPeerCredentials. */
  setPeerCredentials(
    address: string,
    pem: { ca: string; cert: string; key: string },
  ): Promise<{ identity: string; notAfterMs: number; changed: boolean }> {
    return this.call((o, cb) =>
      this.raw.SetPeerCredentials(
        { address, caPem: pem.ca, certPem: pem.cert, keyPem: pem.key },
        o,
        cb,
      ),
    );
  }

  stopReplication(name: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.StopReplication({ name }, o, cb));
  }

  /** `replicateTo`: a move's switchover (see PromoteRequest.replicate_to). */
  async promote(name: string, force = false, replicateTo?: string[]): Promise<PromoteInfo> {
    const r = await this.call<PromoteResponse__Output>((o, cb) =>
      this.raw.Promote({ name, force, replicateTo, replacePeers: !!replicateTo }, o, cb),
    );
    if (!r.volume) throw new Error(`the agent promoted ${name} but did not describe the volume`);
    return { ...r, volume: r.volume };
  }

  discardPeer(name: string, peer: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.DiscardPeer({ name, peer }, o, cb));
  }

  demote(name: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.Demote({ name }, o, cb));
  }

  /** The switchover of a move: snapshot, then demote if `to` is in sync (see Agent.handover). */
  handover(
    volumes: string[],
    to: string,
    snapshot: string,
  ): Promise<{ volumes: VolumeInfo[]; holdMs: number }> {
    return this.call<{ volumes: VolumeInfo[]; holdMs: number }>((o, cb) =>
      this.raw.Handover({ volumes, to, snapshot }, o, cb),
    );
  }

  async deleteVolume(name: string, force = false): Promise<void> {
    await this.call((o, cb) => this.raw.DeleteVolume({ name, force }, o, cb));
  }

  async releaseVolume(name: string, force = false): Promise<void> {
    await this.call((o, cb) => this.raw.ReleaseVolume({ name, force }, o, cb));
  }

  createSnapshot(volume: string, name: string, label = '', retain = 0): Promise<SnapshotInfo> {
    return this.call<SnapshotInfo>((o, cb) =>
      this.raw.CreateSnapshot({ volume, name, label, retain }, o, cb),
    );
  }

  async listSnapshots(volume = ''): Promise<SnapshotInfo[]> {
    return (
      await this.call<{ snapshots: SnapshotInfo[] }>((o, cb) =>
        this.raw.ListSnapshots({ volume }, o, cb),
      )
    ).snapshots;
  }

  async deleteSnapshot(volume: string, name: string, force = false): Promise<void> {
    await this.call((o, cb) => this.raw.DeleteSnapshot({ volume, name, force }, o, cb));
  }

  rollbackSnapshot(volume: string, name: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) => this.raw.RollbackSnapshot({ volume, name }, o, cb));
  }

  /** Names a set of volumes snapshotted together; idempotent for the same volumes. */
  createGroup(name: string, volumes: string[]): Promise<GroupInfo> {
    return this.call<GroupInfo>((o, cb) => this.raw.CreateGroup({ name, volumes }, o, cb));
  }

  async listGroups(): Promise<GroupInfo[]> {
    return (await this.call<{ groups: GroupInfo[] }>((o, cb) => this.raw.ListGroups({}, o, cb)))
      .groups;
  }

  async deleteGroup(name: string): Promise<void> {
    await this.call((o, cb) => this.raw.DeleteGroup({ name }, o, cb));
  }

  /** Snapshots every member of a group at one write-order point (and its in-sync copies). */
  snapshotGroup(
    group: string,
    name: string,
    options: { label?: string; noHold?: boolean; holdTimeoutMs?: number; retain?: number } = {},
  ): Promise<GroupSnapshotInfo> {
    return this.call<GroupSnapshotInfo>((o, cb) =>
      this.raw.SnapshotGroup({ group, name, ...options }, o, cb),
    );
  }

  /**
   * Compares a snapshot's per-region hashes on this copy and on its peers' copies. It reads
   * the whole snapshot on every copy, so it gets its own deadline (default 10 minutes).
   */
  verifySnapshot(volume: string, name: string, timeoutMs = 600_000): Promise<Verification> {
    return this.call<Verification>(
      (o, cb) => this.raw.VerifySnapshot({ volume, name }, o, cb),
      timeoutMs,
    );
  }

  cloneSnapshot(volume: string, name: string, newVolume: string): Promise<VolumeInfo> {
    return this.call<VolumeInfo>((o, cb) =>
      this.raw.CloneSnapshot({ volume, name, newVolume }, o, cb),
    );
  }

  close(): void {
    this.raw.close();
  }
}
