import { formatSize, parseSize } from '../../lib/size';

describe('sizes', () => {
  it.each([
    ['4096', 4096],
    ['64KiB', 65536],
    ['256MiB', 256 * 2 ** 20],
    ['1GiB', 2 ** 30],
    ['1.5GiB', 1.5 * 2 ** 30],
    ['10G', 1e10],
    ['2Gi', 2 ** 31],
  ])('parses %s', (text, bytes) => expect(parseSize(text)).toBe(bytes));

  it.each(['', 'lots', '-1MiB', '1.5', '1 parsec', '1e3'])('rejects %j with a hint', (text) => {
    expect(() => parseSize(text, '--size')).toThrow(/invalid --size .*e\.g\. 256MiB/);
  });

  it('formats in binary units', () => {
    expect(formatSize(0)).toBe('0B');
    expect(formatSize(65536)).toBe('64KiB');
    expect(formatSize(1.5 * 2 ** 30)).toBe('1.5GiB');
  });
});
