import { ChunkQueue } from '../../sidecar/src/frontend/nbd/chunk-queue';

describe('ChunkQueue', () => {
  it('hands out views without copying when bytes lie in one chunk', () => {
    const q = new ChunkQueue();
    const chunk = Buffer.from('abcdefgh');
    q.push(chunk);
    const view = q.take(3);
    expect(view.toString()).toBe('abc');
    expect(view.buffer).toBe(chunk.buffer);
    expect(q.length).toBe(5);
  });

  it('copies across chunk boundaries and keeps the order', () => {
    const q = new ChunkQueue();
    for (const s of ['ab', 'cde', 'f', 'ghij']) q.push(Buffer.from(s));
    expect(q.take(4).toString()).toBe('abcd');
    expect(q.take(1).toString()).toBe('e');
    expect(q.take(5).toString()).toBe('fghij');
    expect(q.length).toBe(0);
  });

  it('skips bytes across chunks and refuses to take more than it holds', () => {
    const q = new ChunkQueue();
    q.push(Buffer.from('abc'));
    q.push(Buffer.from('defg'));
    expect(q.skip(5)).toBe(5);
    expect(q.take(2).toString()).toBe('fg');
    expect(q.skip(10)).toBe(0);
    expect(() => q.take(1)).toThrow(RangeError);
  });
});
