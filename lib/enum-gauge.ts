// An enum as Prometheus wants it: one 0/1 series per state, 1 for the current one. A state that
// was never entered is still there as 0, so alerts and graphs need no `absent()`, and a change
// of state is a change of value rather than a series appearing and another going stale.
import type client from 'prom-client';

export function setStates<L extends string>(
  gauge: client.Gauge<L>,
  labels: Partial<Record<L, string>>,
  label: L,
  states: readonly string[],
  current: string,
): void {
  for (const s of states)
    gauge.set({ ...labels, [label]: s } as Partial<Record<L, string>>, s === current ? 1 : 0);
}
