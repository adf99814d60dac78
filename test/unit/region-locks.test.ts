import { RegionLocks } from '../../sidecar/src/engine/region-locks';

describe('RegionLocks', () => {
  it('grants disjoint ranges at once and makes overlapping ones wait', async () => {
    const locks = new RegionLocks();
    expect(locks.acquire(0, 1)).toBeUndefined();
    expect(locks.acquire(2, 3)).toBeUndefined();
    let granted = false;
    const waiting = locks.acquire(1, 2)!.then(() => (granted = true));
    await Promise.resolve();
    expect(granted).toBe(false);
    locks.release(0, 1);
    await Promise.resolve();
    expect(granted).toBe(false); // region 2 still held
    locks.release(2, 3);
    await waiting;
    expect(granted).toBe(true);
    expect(locks.heldCount).toBe(2);
  });

  it('serves overlapping waiters in arrival order, and lets a disjoint one pass', async () => {
    const locks = new RegionLocks();
    expect(locks.acquire(5, 5)).toBeUndefined();
    const order: string[] = [];
    const a = locks.acquire(5, 6)!.then(() => order.push('a'));
    const b = locks.acquire(6, 6)!.then(() => order.push('b')); // free, but behind a (overlap on 6)
    expect(locks.acquire(9, 9)).toBeUndefined(); // overlaps nothing waiting or held
    locks.release(5, 5);
    await a;
    expect(order).toEqual(['a']);
    locks.release(5, 6);
    await b;
    expect(order).toEqual(['a', 'b']);
  });
});
