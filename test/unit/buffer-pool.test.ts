import { BufferPool } from '../../lib/buffer-pool';

describe('BufferPool', () => {
  it('hands out buffers of the exact length and reuses released ones of the same class', () => {
    const pool = new BufferPool();
    const a = pool.acquire(5000);
    expect(a.length).toBe(5000);
    expect(a.buffer.byteLength).toBe(8192);
    pool.release(a);
    expect(pool.idleBytes()).toBe(8192);
    const b = pool.acquire(8000);
    expect(b.buffer).toBe(a.buffer);
    expect(pool.idleBytes()).toBe(0);
  });

  it("never takes in buffers it did not create (such as slices of Node's shared pool)", () => {
    const pool = new BufferPool();
    pool.release(Buffer.allocUnsafe(100));
    pool.release(Buffer.alloc(4096));
    expect(pool.idleBytes()).toBe(0);
  });

  it('keeps at most the configured idle bytes per class', () => {
    const pool = new BufferPool(3 * 65536);
    const bufs = Array.from({ length: 5 }, () => pool.acquire(65536));
    for (const b of bufs) pool.release(b);
    expect(pool.idleBytes()).toBe(3 * 65536);
  });
});
