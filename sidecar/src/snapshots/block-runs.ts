// Which blocks changed since a snapshot, as sorted runs of consecutive blocks. The logs index
// blocks one by one and in the order they were first overwritten; a backup, a resync or a
// rollback wants ranges in volume order. Sorting millions of block numbers costs far more than
// the answer is worth (1 % of 1 TiB is 2.7 M blocks, and often a few thousand runs). Writers
// save runs of blocks in order, so the runs are gathered as the index is read, and only the
// runs are sorted: their starts and their ends apart, which is all a union of intervals needs.
import { BLOCK } from './saved-log';

export class BlockRuns {
  private constructor(
    /** First block of each run, ascending. */
    private readonly starts: Float64Array,
    /** The block after each run. */
    private readonly ends: Float64Array,
  ) {}

  /** The union of the keys (block numbers) of every index, in any order, repeats allowed. */
  static union(indexes: Iterable<ReadonlyMap<number, unknown>>): BlockRuns {
    // Typed arrays grown by hand: a push costs ten times a store here, and there may be
    // hundreds of thousands of runs.
    let starts: Float64Array = new Float64Array(1024);
    let ends: Float64Array = new Float64Array(1024);
    let n = 0;
    // forEach, not an iterator: until the JIT has warmed up, an iterator allocates a result per
    // key, and a cold call on 2.7 M keys took 10 times as long.
    let from = 0;
    let to = 0;
    const close = () => {
      if (n === starts.length) {
        starts = grown(starts);
        ends = grown(ends);
      }
      starts[n] = from;
      ends[n++] = to;
    };
    const add = (_: unknown, block: number) => {
      if (block === to) {
        to++;
        return;
      }
      if (to > from) close();
      from = block;
      to = block + 1;
    };
    for (const index of indexes) index.forEach(add);
    if (to > from) close();
    return BlockRuns.merged(starts.subarray(0, n).sort(), ends.subarray(0, n).sort());
  }

  /**
   * Runs that may overlap or touch, as disjoint ones: a sweep over the sorted starts and ends
   * counts the runs covering each point. A start is taken before an end at the same block, so
   * touching runs join.
   */
  private static merged(starts: Float64Array, ends: Float64Array): BlockRuns {
    const outStarts = new Float64Array(starts.length);
    const outEnds = new Float64Array(starts.length);
    let n = 0;
    let open = 0;
    let first = 0;
    let j = 0;
    for (let i = 0; i < starts.length;) {
      if (starts[i] <= ends[j]) {
        if (open++ === 0) first = starts[i];
        i++;
        continue;
      }
      if (--open === 0) {
        outStarts[n] = first;
        outEnds[n++] = ends[j];
      }
      j++;
    }
    // Every start is in: the last end closes the last run.
    if (starts.length > 0) {
      outStarts[n] = first;
      outEnds[n++] = ends[ends.length - 1];
    }
    return new BlockRuns(outStarts.slice(0, n), outEnds.slice(0, n));
  }

  get count(): number {
    return this.starts.length;
  }

  start(i: number): number {
    return this.starts[i];
  }

  end(i: number): number {
    return this.ends[i];
  }

  /** The first run that ends after `block` (`count` if none does). */
  firstEndingAfter(block: number): number {
    let lo = 0;
    let hi = this.ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid] <= block) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Marks every run's bytes in `target` (a bitmap of regions, say). */
  markBytes(target: { markRange(offset: number, length: number): void }): void {
    for (let i = 0; i < this.starts.length; i++)
      target.markRange(this.starts[i] * BLOCK, (this.ends[i] - this.starts[i]) * BLOCK);
  }

  /** Each run as [first block, count], split so that none holds more than `most` blocks. */
  *pieces(most: number): Generator<[number, number]> {
    for (let i = 0; i < this.starts.length; i++)
      for (let b = this.starts[i]; b < this.ends[i]; b += most)
        yield [b, Math.min(most, this.ends[i] - b)];
  }
}

function grown(a: Float64Array): Float64Array {
  const b = new Float64Array(a.length * 2);
  b.set(a);
  return b;
}
