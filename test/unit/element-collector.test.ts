import { ElementCollector } from '../../lib/element-collector';

describe('ElementCollector', () => {
  it('hands out an element lying inside one read as a view, without copying', () => {
    const c = new ElementCollector();
    const read = Buffer.from('..HEADER..');
    const el = c.take(6, read, 2, read.length);
    expect(el?.toString()).toBe('HEADER');
    expect(el?.buffer).toBe(read.buffer);
    expect(c.used).toBe(6);
  });

  it('collects an element split across several reads, larger than its initial buffer', () => {
    const c = new ElementCollector();
    const whole = Buffer.from('x'.repeat(50) + 'y'.repeat(50));
    expect(c.take(100, whole.subarray(0, 30), 0, 30)).toBeUndefined();
    expect(c.used).toBe(30);
    expect(c.take(100, whole.subarray(30, 90), 0, 60)).toBeUndefined();
    const el = c.take(100, whole.subarray(90), 0, 10);
    expect(el?.equals(whole)).toBe(true);
    // The next element starts fresh.
    expect(c.take(2, Buffer.from('ab'), 0, 2)?.toString()).toBe('ab');
  });

  it('takes only what the element needs from a read that holds more', () => {
    const c = new ElementCollector();
    expect(c.take(4, Buffer.from('ab'), 0, 2)).toBeUndefined();
    expect(c.take(4, Buffer.from('cdEF'), 0, 4)?.toString()).toBe('abcd');
    expect(c.used).toBe(2);
  });
});
