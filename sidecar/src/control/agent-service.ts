// The Agent gRPC control service: what the operator and `lockstep ctl` call on a node agent.
import type * as grpc from '@grpc/grpc-js';
import type { AgentHandlers } from '../../../proto';
import { packageVersion } from '../../../lib/package-root';

export interface AgentIdentity {
  node: string;
  startedAtMs: number;
}

export function agentHandlers(identity: AgentIdentity): AgentHandlers {
  return {
    GetInfo(_call, callback: grpc.sendUnaryData<object>) {
      callback(null, { node: identity.node, version: packageVersion, startedAtMs: identity.startedAtMs });
    },
  };
}
