// The Agent gRPC control service: what the operator and `lockstep ctl` call on a node agent.
// It translates between the wire messages and the Agent; errors keep their Lockstep codes.
import type { AgentHandlers } from '../../../proto';
import { packageVersion } from '../../../lib/package-root';
import { unary } from '../../../lib/grpc-errors';
import type { Agent } from '../agent';

export interface AgentIdentity {
  readonly options: { node: string };
  readonly startedAtMs: number;
}

type AgentApi = AgentIdentity &
  Pick<Agent, 'volumes' | 'createVolume' | 'deleteVolume' | 'nbdSocket' | 'nbdTcpAddress'> & {
    readonly options: { node: string; dataDir: string };
  };

function info(agent: AgentIdentity) {
  return { node: agent.options.node, version: packageVersion, startedAtMs: agent.startedAtMs };
}

export function agentHandlers(agent: AgentApi): AgentHandlers {
  return {
    GetInfo: unary(() => info(agent)),
    GetStatus: unary(() => ({
      info: info(agent),
      dataDir: agent.options.dataDir,
      nbdSocket: agent.nbdSocket,
      nbdTcp: agent.nbdTcpAddress,
      volumes: agent.volumes(),
    })),
    ListVolumes: unary(() => ({ volumes: agent.volumes() })),
    CreateVolume: unary((req) => agent.createVolume(req.name, req.sizeBytes, req.readOnly)),
    DeleteVolume: unary(async (req) => {
      await agent.deleteVolume(req.name, req.force);
      return {};
    }),
  };
}
