// Binds a grpc-js server with the services a process exports and reports the port it got.
import * as grpc from '@grpc/grpc-js';

export interface BoundServer {
  server: grpc.Server;
  /** The address actually bound, e.g. 127.0.0.1:43121 when asked for port 0. */
  address: string;
  /** Lets calls in flight finish for up to SHUTDOWN_GRACE_MS, then cancels whatever is left. */
  close(): Promise<void>;
}

/**
 * How long a stopping server waits for its calls and connections to end. grpc-js closes the
 * connections it has when the shutdown starts, but not one accepted after: a client whose
 * connection got GOAWAY reconnects at once (the operator keeps channels to every agent), and
 * that connection would hold the shutdown open until the client leaves.
 */
const SHUTDOWN_GRACE_MS = 5_000;

export type ServiceBinding = [grpc.ServiceDefinition, grpc.UntypedServiceImplementation];

export async function startGrpcServer(
  listen: string,
  services: ServiceBinding[],
  credentials = grpc.ServerCredentials.createInsecure(),
): Promise<BoundServer> {
  const server = new grpc.Server({
    'grpc.keepalive_time_ms': 10_000,
    'grpc.keepalive_timeout_ms': 5_000,
    'grpc.keepalive_permit_without_calls': 1,
  });
  for (const [definition, impl] of services) server.addService(definition, impl);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(listen, credentials, (err, p) => (err ? reject(err) : resolve(p))),
  );
  const host = listen.slice(0, listen.lastIndexOf(':'));
  return {
    server,
    address: `${host}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        const force = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, SHUTDOWN_GRACE_MS);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      }),
  };
}
