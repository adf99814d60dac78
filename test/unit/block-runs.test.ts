// The changed blocks' runs: gathered from the logs' indexes in any order, merged by a sweep.
import { BlockRuns } from '../../sidecar/src/snapshots/block-runs';

/** A log's index of these blocks (what it maps them to does not matter here). */
const index = (blocks: number[]) => new Map(blocks.map((b) => [b, 0]));

/** The runs the slow way: sort the distinct blocks and join neighbours. */
function expected(blocks: number[]): [number, number][] {
  const sorted = [...new Set(blocks)].sort((a, b) => a - b);
  const out: [number, number][] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last[1] === b) last[1] = b + 1;
    else out.push([b, b + 1]);
  }
  return out;
}

function actual(runs: BlockRuns): [number, number][] {
  return Array.from({ length: runs.count }, (_, i) => [runs.start(i), runs.end(i)]);
}

describe('block runs', () => {
  it('joins neighbours and overlaps from several indexes, with repeats', () => {
    const a = [31, 32, 33, 0, 5, 6, 7, 63, 64, 65535, 65536, 65537];
    const b = [6, 7, 8, 200000, 131071, 131072];
    const runs = BlockRuns.union([index(a), index(b)]);
    expect(actual(runs)).toEqual(expected([...a, ...b]));
    expect(actual(runs).reduce((n, [s, e]) => n + e - s, 0)).toBe(new Set([...a, ...b]).size);
  });

  it('joins runs that touch whatever order they were saved in, and keeps blocks beyond 2^32', () => {
    const far = 2 ** 40 + 17;
    const blocks = [
      ...Array.from({ length: 96 }, (_, i) => 32 + i), // one run saved in order
      31, // saved later, touching its start
      128, // saved later, touching its end
      191, // apart
      far,
      far + 1,
    ];
    expect(actual(BlockRuns.union([index(blocks)]))).toEqual(expected(blocks));
  });

  it('agrees with sorting on random sets, dense and sparse', () => {
    let seed = 7;
    const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
    for (const span of [100, 5000, 1_000_000]) {
      for (let round = 0; round < 20; round++) {
        const blocks = Array.from({ length: 1 + Math.floor(rnd() * 3000) }, () =>
          Math.floor(rnd() * span),
        );
        expect(actual(BlockRuns.union([index(blocks)]))).toEqual(expected(blocks));
      }
    }
  });

  it('splits runs into pieces of at most the size asked, and marks their bytes', () => {
    const runs = BlockRuns.union([index([1, 2, 3, 4, 5, 9])]);
    expect([...runs.pieces(2)]).toEqual([
      [1, 2],
      [3, 2],
      [5, 1],
      [9, 1],
    ]);
    const marked: [number, number][] = [];
    runs.markBytes({ markRange: (offset, length) => marked.push([offset, length]) });
    expect(marked).toEqual([
      [4096, 5 * 4096],
      [9 * 4096, 4096],
    ]);
    expect(runs.firstEndingAfter(0)).toBe(0);
    expect(runs.firstEndingAfter(6)).toBe(1);
    expect(runs.firstEndingAfter(10)).toBe(2);
    expect(BlockRuns.union([]).count).toBe(0);
  });
});
