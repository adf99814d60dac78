// Option parsers for commander: a bad value is reported as a usage error naming the option.
import { InvalidArgumentError } from 'commander';
import { errorMessage } from '../lib/errors';
import { parseSize } from '../lib/size';

export function positiveInteger(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new InvalidArgumentError(`expected a positive integer, got ${JSON.stringify(value)}`);
  }
  return n;
}

export function nonNegativeInteger(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new InvalidArgumentError(`expected an integer >= 0, got ${JSON.stringify(value)}`);
  }
  return n;
}

/** A size such as 64MiB. */
export function byteSize(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError(errorMessage(err));
  }
}

const DURATION_UNITS: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** A duration such as 90s, 30m, 24h or 7d, in milliseconds. */
export function duration(value: string): number {
  const m = /^(\d+)([smhd])$/.exec(value.trim());
  const n = m ? Number(m[1]) * (DURATION_UNITS[m[2] ?? ''] ?? 0) : 0;
  if (!m || n <= 0)
    throw new InvalidArgumentError(
      `expected a duration such as 90s, 30m, 24h or 7d, got ${JSON.stringify(value)}`,
    );
  return n;
}
