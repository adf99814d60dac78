// What every Lockstep process exports about itself: lockstep_build_info (the Prometheus
// convention: a gauge of 1 whose labels say which version runs, on which Node; a rollout shows
// as two versions at once) and the runtime's own metrics (CPU, memory, event loop lag, GC).
import client from 'prom-client';
import { packageVersion } from './package-root';

/**
 * prom-client's gauges of live handles, requests and resources end in `_total`, which the
 * convention keeps for counters (promtool check metrics rejects them); the rest are kept.
 */
const MISNAMED = [
  'nodejs_active_handles_total',
  'nodejs_active_requests_total',
  'nodejs_active_resources_total',
];

/**
 * How often the event loop's delay is sampled. prom-client's `nodejs_eventloop_lag_*` figures
 * are the whole time between two samples, so an idle loop reads this much: the delay is the
 * figure minus this.
 */
export const EVENT_LOOP_SAMPLE_MS = 10;

export function registerProcessMetrics(registry: client.Registry, prefix: string): void {
  client.collectDefaultMetrics({
    register: registry,
    prefix,
    eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS,
  });
  for (const name of MISNAMED) registry.removeSingleMetric(`${prefix}${name}`);
  new client.Gauge({
    name: 'lockstep_build_info',
    help: 'Always 1: the Lockstep version and the Node runtime this process runs.',
    labelNames: ['version', 'runtime'],
    registers: [registry],
  }).set({ version: packageVersion, runtime: process.version }, 1);
}
