// `lockstep:changed:<snapshot>` extents from the runs of changed 4 KiB blocks.
import { BlockRuns } from '../../sidecar/src/snapshots/block-runs';
import { CHANGED, changedExtents } from '../../sidecar/src/snapshots/changed-contexts';

const K = 4096;
const runs = (...blocks: number[]) => BlockRuns.union([new Map(blocks.map((b) => [b, 0]))]);

describe('changed extents', () => {
  it('alternates unchanged and changed runs, merging consecutive blocks', () => {
    expect(changedExtents(runs(1, 2, 5), 0, 8 * K)).toEqual([
      { length: K, flags: 0 },
      { length: 2 * K, flags: CHANGED },
      { length: 2 * K, flags: 0 },
      { length: K, flags: CHANGED },
      { length: 2 * K, flags: 0 },
    ]);
  });

  it('starts and ends inside blocks without exceeding the request', () => {
    expect(changedExtents(runs(1, 2, 5), K + 100, 2 * K)).toEqual([
      { length: 2 * K - 100, flags: CHANGED },
      { length: 100, flags: 0 },
    ]);
    expect(changedExtents(runs(1, 2, 5), K + 100, K)).toEqual([{ length: K, flags: CHANGED }]);
    expect(changedExtents(runs(1, 2, 5), 100, K)).toEqual([
      { length: K - 100, flags: 0 },
      { length: 100, flags: CHANGED },
    ]);
  });

  it('reports one unchanged extent when nothing changed in the range', () => {
    expect(changedExtents(runs(), 0, 1 << 30)).toEqual([{ length: 1 << 30, flags: 0 }]);
    expect(changedExtents(runs(0, 1000), 4 * K, 10 * K)).toEqual([{ length: 10 * K, flags: 0 }]);
  });

  it('answers from a million changed blocks by search, not by a walk from the start', () => {
    const blocks = Array.from({ length: 1_000_000 }, (_, i) => i * 2);
    const ext = changedExtents(
      BlockRuns.union([new Map(blocks.map((b) => [b, 0]))]),
      1_999_990 * K,
      4 * K,
    );
    expect(ext).toEqual([
      { length: K, flags: CHANGED },
      { length: K, flags: 0 },
      { length: K, flags: CHANGED },
      { length: K, flags: 0 },
    ]);
  });
});
