import * as grpc from '@grpc/grpc-js';
import { agentProto } from '../../proto';
import { agentHandlers } from '../../sidecar/src/control/agent-service';
import { startGrpcServer, type BoundServer } from '../../sidecar/src/control/grpc-server';
import { packageVersion } from '../../lib/package-root';

describe('Agent gRPC service over a real socket', () => {
  let bound: BoundServer;
  beforeAll(async () => {
    const proto = agentProto();
    bound = await startGrpcServer('127.0.0.1:0', [
      [proto.Agent.service, agentHandlers({ node: 'node-a', startedAtMs: 1234 })],
    ]);
  });
  afterAll(() => bound.close());

  it('answers GetInfo with the node, version and start time', async () => {
    const client = new (agentProto().Agent)(bound.address, grpc.credentials.createInsecure());
    try {
      const info = await new Promise((resolve, reject) =>
        client.GetInfo({}, (err, res) => (err ? reject(err) : resolve(res))),
      );
      expect(info).toEqual({ node: 'node-a', version: packageVersion, startedAtMs: 1234 });
      expect(bound.address).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(bound.address).not.toBe('127.0.0.1:0');
    } finally {
      client.close();
    }
  });
});
