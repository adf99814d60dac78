// The agent's and the operator's metric registries as fully as they can be exported (with TLS
// on, whose series exist only then), built from stand-ins for what a running process has. The
// metrics reference (docs/METRICS.md) is written from them, and the tests check the alerts and
// the dashboard against them, so none of the three can name a metric the code lacks.
import pino from 'pino';
import type client from 'prom-client';
import { securityMetrics } from '../lib/tls/security-metrics';
import type { Transport } from '../lib/tls/transport';
import { ControllerMetrics } from '../operator/src/metrics';
import { AgentMetrics } from '../sidecar/src/metrics';
import type { VolumeStore } from '../sidecar/src/store/volume-store';

export function exportedRegistries(): { agent: client.Registry; operator: client.Registry } {
  const secure = { secure: true, dir: { notAfter: new Date() } } as unknown as Transport;
  const silent = pino({ level: 'silent' });
  const agent = new AgentMetrics({ list: () => [] } as unknown as VolumeStore, 'n', () => []);
  securityMetrics(agent.registry, secure, silent);
  const operator = new ControllerMetrics();
  securityMetrics(operator.registry, secure, silent);
  return { agent: agent.registry, operator: operator.registry };
}
