// PeerOrder: which regions still have an op on its way to the peers, and what a later op on an
// overlapping range must wait for.
import { PeerOrder } from '../../sidecar/src/engine/peer-order';

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const settledNow = async (p: Promise<void>) => {
  let done = false;
  void p.then(() => (done = true));
  await new Promise((r) => setImmediate(r));
  return done;
};

describe('PeerOrder', () => {
  it('has nothing to wait for until an op is recorded, and forgets ops once they settle', async () => {
    const order = new PeerOrder();
    expect(order.after(0, 100)).toBeUndefined();
    expect(order.all()).toBeUndefined();
    const op = deferred();
    order.record(3, 5, op.promise);
    expect(order.after(0, 2)).toBeUndefined();
    expect(order.after(6, 9)).toBeUndefined();
    const ahead = order.after(5, 7)!;
    expect(await settledNow(ahead)).toBe(false);
    op.resolve();
    expect(await settledNow(ahead)).toBe(true);
    expect(order.after(0, 100)).toBeUndefined();
  });

  it('makes a range wait for every op it overlaps, and the latest op on a region replaces older ones', async () => {
    const order = new PeerOrder();
    const a = deferred();
    const b = deferred();
    order.record(0, 1, a.promise);
    order.record(4, 4, b.promise);
    const both = order.after(1, 4)!;
    a.resolve();
    expect(await settledNow(both)).toBe(false); // b still pending
    b.resolve();
    expect(await settledNow(both)).toBe(true);

    // A later op on region 2 follows the one there, and then stands for both.
    const c = deferred();
    order.record(2, 2, c.promise);
    const d = order.after(2, 3)!.then(() => undefined);
    order.record(2, 3, d);
    expect(order.after(2, 2)).toBe(d);
    expect(order.after(3, 3)).toBe(d);
    c.resolve();
    expect(await settledNow(d)).toBe(true);
    expect(order.all()).toBeUndefined();
  });

  it('waits for everything recorded so far with all()', async () => {
    const order = new PeerOrder();
    const a = deferred();
    const b = deferred();
    order.record(0, 0, a.promise);
    order.record(9, 9, b.promise);
    const all = order.all()!;
    a.resolve();
    expect(await settledNow(all)).toBe(false);
    b.resolve();
    expect(await settledNow(all)).toBe(true);
  });
});
