// Durations as Kubernetes and Go write them (500ms, 5s, 1m30s, 2h); a bare number is seconds,
// as the other ctl flags take it.
import { LockstepError } from './errors';

const UNIT_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 };

/** Milliseconds in `text`; throws a clear error naming `what` if it is not a duration. */
export function parseDuration(text: string, what: string): number {
  const t = text.trim();
  if (/^\d+(\.\d+)?$/.test(t)) return Math.round(Number(t) * 1_000);
  const parts = [...t.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h)/g)];
  if (parts.length > 0 && parts.map((p) => p[0]).join('') === t)
    return Math.round(parts.reduce((sum, p) => sum + Number(p[1]) * UNIT_MS[p[2]], 0));
  throw new LockstepError(
    'LOCKSTEP_ERR_INVALID_ARGUMENT',
    `invalid ${what} ${JSON.stringify(text)}: use a duration such as 500ms, 5s or 1m30s`,
  );
}

/** 1500 → "1.5s", 90000 → "1m30s", 5400000 → "1h30m": the inverse of parseDuration, for output. */
export function formatDuration(ms: number): string {
  if (ms < 1_000) return `${ms}ms`;
  const h = Math.floor(ms / 3_600_000);
  if (h > 0) {
    const minutes = Math.floor((ms % 3_600_000) / 60_000);
    return `${h}h${minutes > 0 ? `${minutes}m` : ''}`;
  }
  const m = Math.floor(ms / 60_000);
  const s = (ms % 60_000) / 1_000;
  return m > 0 ? `${m}m${s > 0 ? `${s}s` : ''}` : `${s}s`;
}
