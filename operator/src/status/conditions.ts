// Status bookkeeping in the apimachinery style: a condition's lastTransitionTime moves only
// when its status flips, and a status is written only when it differs from what is stored.
import type { Condition } from '../api/types';

export type DesiredCondition = Omit<Condition, 'lastTransitionTime' | 'observedGeneration'>;

/** The conditions after applying `desired`, keeping transition times of unchanged statuses. */
export function mergeConditions(
  existing: readonly Condition[] | undefined,
  desired: readonly DesiredCondition[],
  observedGeneration: number,
  now: Date,
): Condition[] {
  return desired.map((d) => {
    const old = existing?.find((c) => c.type === d.type);
    return {
      type: d.type,
      status: d.status,
      observedGeneration,
      lastTransitionTime:
        old && old.status === d.status ? old.lastTransitionTime : now.toISOString(),
      reason: d.reason,
      message: d.message,
    };
  });
}

/** Order-insensitive (for object keys) deep equality of two JSON values. */
export function sameJson(a: unknown, b: unknown): boolean {
  return canonical(a) === canonical(b);
}

function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>)
      .filter(([, x]) => x !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, x]) => `${JSON.stringify(k)}:${canonical(x)}`).join(',')}}`;
  }
  return JSON.stringify(v);
}
