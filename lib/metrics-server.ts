// The HTTP endpoint shared by the agent and the operator: GET /metrics renders a prom-client
// registry for Prometheus; /healthz (the process answers) and /readyz (it does its job: 503
// until then) are for the kubelet's probes; anything else is a 404 that says what is there.
import http from 'node:http';
import type { Registry } from 'prom-client';

export interface MetricsServer {
  address: string;
  close(): Promise<void>;
}

export async function serveMetrics(
  registry: Registry,
  host: string,
  port: number,
  ready: () => boolean = () => true,
): Promise<MetricsServer> {
  const server = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200).end('ok\n');
      return;
    }
    if (req.url === '/readyz') {
      const yes = ready();
      res.writeHead(yes ? 200 : 503).end(yes ? 'ready\n' : 'not ready\n');
      return;
    }
    if (req.url !== '/metrics') {
      res.writeHead(404).end('metrics are at /metrics (probes: /healthz, /readyz)\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'Content-Type': registry.contentType }).end(text),
      (err: unknown) => res.writeHead(500).end(String(err)),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as { address: string; port: number };
  return {
    address: `${addr.address}:${addr.port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
