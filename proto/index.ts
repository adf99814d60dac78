// Loads the lockstep.v1 protos at run time with the same options the type generator uses
// (scripts/gen-proto.js), so the generated types describe exactly what grpc-js hands us.
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { packageRoot } from '../lib/package-root';
import type { ProtoGrpcType as AgentProto } from './gen/agent';
import type { ProtoGrpcType as ReplicationProto } from './gen/replication';
import type { ProtoGrpcType as MediatorProto } from './gen/mediator';

const protoRoot = path.join(packageRoot, 'proto');

const loaderOptions: protoLoader.Options = {
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [protoRoot],
};

function load<T>(file: string): T {
  const definition = protoLoader.loadSync(file, loaderOptions);
  return grpc.loadPackageDefinition(definition) as unknown as T;
}

let agent: AgentProto['lockstep']['v1'] | undefined;

export function agentProto(): AgentProto['lockstep']['v1'] {
  agent ??= load<AgentProto>('lockstep/v1/agent.proto').lockstep.v1;
  return agent;
}

let replication: ReplicationProto['lockstep']['v1'] | undefined;

export function replicationProto(): ReplicationProto['lockstep']['v1'] {
  replication ??= load<ReplicationProto>('lockstep/v1/replication.proto').lockstep.v1;
  return replication;
}

let mediator: MediatorProto['lockstep']['v1'] | undefined;

export function mediatorProto(): MediatorProto['lockstep']['v1'] {
  mediator ??= load<MediatorProto>('lockstep/v1/mediator.proto').lockstep.v1;
  return mediator;
}

export type { AgentClient } from './gen/lockstep/v1/Agent';
export type { MediatorClient, MediatorHandlers } from './gen/lockstep/v1/Mediator';
export type { ReplicationClient, ReplicationHandlers } from './gen/lockstep/v1/Replication';
export type { AgentHandlers } from './gen/lockstep/v1/Agent';
