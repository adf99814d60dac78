// What a process shows about its own security: whether it runs with TLS at all, when its
// certificate expires (alert well before), and every call or lane refused, by service and role.
import client from 'prom-client';
import type { Logger } from '../logger';
import { logRefusal, type RefusalSink } from './access-policy';
import type { Transport } from './transport';

export function securityMetrics(
  registry: client.Registry,
  transport: Transport,
  log: Logger,
): RefusalSink {
  const registers = [registry];
  new client.Gauge({
    name: 'lockstep_tls_enabled',
    help: '1 with mutual TLS, 0 when started with --insecure (plaintext, no authorization).',
    registers,
  }).set(transport.secure ? 1 : 0);
  if (transport.secure) {
    const dir = transport.dir;
    new client.Gauge({
      name: 'lockstep_tls_certificate_expiry_timestamp_seconds',
      help: 'When the certificate in use expires (unix time); it is reloaded when rotated.',
      registers,
      collect() {
        this.set(dir.notAfter.getTime() / 1000);
      },
    });
  }
  const refused = new client.Counter({
    name: 'lockstep_access_refused_total',
    help: 'Calls and data lanes refused by authorization, by service and the caller’s role.',
    labelNames: ['service', 'role'],
    registers,
  });
  return (r) => {
    refused.inc({ service: r.service, role: r.caller?.role ?? 'none' });
    logRefusal(log, r);
  };
}
