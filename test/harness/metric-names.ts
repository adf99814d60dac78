// Which metric names exist: those the agent and the operator register (read from their real
// registries, nothing listed by hand), and those a PromQL expression reads (parsed with
// Prometheus's own grammar). Alerts and the dashboard are checked against the first with the
// second, so neither can drift from the code.
import { parser } from '@prometheus-io/lezer-promql';
import type client from 'prom-client';
import { exportedRegistries } from '../../deploy/metric-registries';

/** Series Prometheus itself makes for every target. */
const PROMETHEUS_OWN = ['up', 'scrape_duration_seconds'];

function namesOf(registry: client.Registry): string[] {
  return registry.getMetricsAsArray().flatMap((m) => {
    const { name, type } = m as unknown as { name: string; type: string };
    return type === 'histogram' ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : [name];
  });
}

/** Every series name the agent and the operator can export (with TLS, the fuller set). */
export function registeredMetricNames(): Set<string> {
  const { agent, operator } = exportedRegistries();
  return new Set([...namesOf(agent), ...namesOf(operator), ...PROMETHEUS_OWN]);
}

/** The metric names a PromQL expression selects; a syntax error is thrown, with where it is. */
export function metricNamesIn(expr: string): string[] {
  const names: string[] = [];
  let error: number | undefined;
  parser.parse(expr).iterate({
    enter(n) {
      if (n.type.isError) error ??= n.from;
      if (n.name === 'Identifier' && n.node.parent?.name === 'VectorSelector')
        names.push(expr.slice(n.from, n.to));
    },
  });
  if (error !== undefined)
    throw new Error(`PromQL syntax error at ${error}: ${expr.slice(error, error + 40)} in ${expr}`);
  return names;
}
