// Option parsers for commander: a bad value is reported as a usage error naming the option.
import { InvalidArgumentError } from 'commander';
import { errorMessage } from '../lib/errors';
import { parseDuration } from '../lib/duration';
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

/** A duration such as 90s, 30m or 24h (Go's form), in milliseconds. */
export function duration(value: string): number {
  let ms = 0;
  try {
    ms = parseDuration(value, 'duration');
  } catch (err) {
    throw new InvalidArgumentError(errorMessage(err));
  }
  if (ms <= 0)
    throw new InvalidArgumentError(`expected a duration above zero, got ${JSON.stringify(value)}`);
  return ms;
}
