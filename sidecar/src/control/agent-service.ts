// The Agent gRPC control service: what the operator and `lockstep ctl` call on a node agent.
// It translates between the wire messages and the Agent; errors keep their Lockstep codes.
import { describeTransport } from '../../../lib/tls/transport';
import type { AgentHandlers } from '../../../proto';
import { packageVersion } from '../../../lib/package-root';
import { unary } from '../../../lib/grpc-errors';
import { LockstepError } from '../../../lib/errors';
import type { Agent, VolumeView } from '../agent';
import { REPLICATION_MODES, type ReplicationMode } from '../store/volume-metadata';
import { DEFAULT_REGION_SIZE } from '../tracking/dirty-bitmap';

function info(agent: Agent) {
  return {
    node: agent.node,
    version: packageVersion,
    startedAtMs: agent.startedAtMs,
    serving: agent.serving,
    address: agent.address,
    transport: describeTransport(agent.options.transport),
  };
}

/** The wire shape of a volume: replication peers carry lastInSyncMs, resync is optional. */
function wire(v: VolumeView) {
  return {
    ...v,
    replication: v.replication && {
      ...v.replication,
      peers: v.replication.peers.map(({ lastInSyncAt, ...p }) => ({
        ...p,
        lastInSyncMs: lastInSyncAt,
      })),
    },
  };
}

function mode(text: string): ReplicationMode {
  const m = (text || 'sync') as ReplicationMode;
  if (!REPLICATION_MODES.includes(m)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `unknown mode ${JSON.stringify(text)}: use ${REPLICATION_MODES.join(', ')}`,
    );
  }
  return m;
}

export function agentHandlers(agent: Agent): AgentHandlers {
  return {
    GetInfo: unary(() => info(agent)),
    GetStatus: unary(() => ({
      info: info(agent),
      dataDir: agent.options.dataDir,
      nbdSocket: agent.nbdSocket,
      nbdTcp: agent.nbdTcpAddress,
      volumes: agent.volumes().map(wire),
      dataAddress: agent.dataAddress,
    })),
    ListVolumes: unary(() => ({ volumes: agent.volumes().map(wire) })),
    GetVolume: unary((req) => wire(agent.volume(req.name))),
    CreateVolume: unary(async (req) =>
      wire(
        await agent.createVolume({
          name: req.name,
          sizeBytes: req.sizeBytes || undefined,
          readOnly: req.readOnly,
          dataPath: req.dataPath || undefined,
          secondaryOfUuid: req.secondaryOfUuid || undefined,
          members: req.members,
        }),
      ),
    ),
    ReleaseVolume: unary(async (req) => {
      await agent.releaseVolume(req.name, req.force);
      return {};
    }),
    StopReplication: unary(async (req) => wire(await agent.stopReplication(req.name))),
    DeleteVolume: unary(async (req) => {
      await agent.deleteVolume(req.name, req.force);
      return {};
    }),
    Replicate: unary(async (req) =>
      wire(
        await agent.replicate(
          req.name,
          req.targets,
          mode(req.mode),
          req.regionSize || DEFAULT_REGION_SIZE,
          req.maxResyncBytesPerSecond,
          req.replaceTargets,
          req.mediator,
        ),
      ),
    ),
    SetPeerCredentials: unary(async (req) => {
      if (!req.address || !req.caPem || !req.certPem || !req.keyPem)
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          'SetPeerCredentials needs address, ca_pem, cert_pem and key_pem',
        );
      const set = await agent.setPeerCredentials(req.address, {
        ca: req.caPem,
        cert: req.certPem,
        key: req.keyPem,
      });
      return { identity: set.identity, notAfterMs: set.notAfter.getTime(), changed: set.changed };
    }),
    Promote: unary(async (req) => {
      const { volume, rolledBack } = await agent.promote(
        req.name,
        req.force,
        req.replacePeers ? req.replicateTo : undefined,
      );
      return { volume: wire(volume), rolledBack };
    }),
    Demote: unary(async (req) => wire(await agent.demote(req.name))),
    Handover: unary(async (req) => {
      const { volumes, holdMs } = await agent.handover(req.volumes, req.to, req.snapshot);
      return { volumes: volumes.map(wire), holdMs };
    }),
    DiscardPeer: unary((req) => wire(agent.discardPeer(req.name, req.peer))),
    CreateSnapshot: unary((req) =>
      agent.createSnapshot(req.volume, req.name, req.label, req.retain),
    ),
    ListSnapshots: unary((req) => ({ snapshots: agent.listSnapshots(req.volume || undefined) })),
    DeleteSnapshot: unary(async (req) => {
      await agent.deleteSnapshot(req.volume, req.name, req.force);
      return {};
    }),
    RollbackSnapshot: unary(async (req) =>
      wire(await agent.rollbackSnapshot(req.volume, req.name)),
    ),
    CreateGroup: unary((req) => agent.createGroup(req.name, req.volumes)),
    ListGroups: unary(() => ({ groups: agent.listGroups() })),
    DeleteGroup: unary(async (req) => {
      await agent.deleteGroup(req.name);
      return {};
    }),
    SnapshotGroup: unary((req) =>
      agent.snapshotGroup(req.group, req.name, req.label, {
        hold: !req.noHold,
        holdTimeoutMs: req.holdTimeoutMs,
        retain: req.retain,
      }),
    ),
    VerifySnapshot: unary((req) => agent.verifySnapshot(req.volume, req.name)),
    CloneSnapshot: unary(async (req) =>
      wire(await agent.cloneSnapshot(req.volume, req.name, req.newVolume)),
    ),
  };
}
