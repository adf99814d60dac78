// Byte sizes as people write them: 4096, 64KiB, 256MiB, 1GiB, 1.5TiB; also K/M/G/T and KB/MB/GB
// (decimal, as kubectl reads "G"). Rendering uses binary units.
import { LockstepError } from './errors';

const UNITS: Record<string, number> = {
  '': 1,
  B: 1,
  KIB: 2 ** 10,
  MIB: 2 ** 20,
  GIB: 2 ** 30,
  TIB: 2 ** 40,
  PIB: 2 ** 50,
  KI: 2 ** 10,
  MI: 2 ** 20,
  GI: 2 ** 30,
  TI: 2 ** 40,
  K: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  KB: 1e3,
  MB: 1e6,
  GB: 1e9,
  TB: 1e12,
};

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const factor = m ? UNITS[m[2].toUpperCase()] : undefined;
  const bytes = m && factor !== undefined ? Number(m[1]) * factor : NaN;
  if (!Number.isSafeInteger(bytes) || bytes < 0) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid ${what} ${JSON.stringify(text)}: use a whole number of bytes with an optional unit, e.g. 256MiB or 10GiB`,
    );
  }
  return bytes;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes}B` : `${Number.isInteger(v) ? v : v.toFixed(1)}${units[i]}`;
}
