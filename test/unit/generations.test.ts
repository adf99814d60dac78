import {
  ZERO_GENERATION,
  advance,
  decideResync,
  type PrimarySide,
  type SecondarySide,
} from '../../sidecar/src/replication/generations';

const P = (
  current: string,
  history: string[] = [],
  bitmapUuid: string | null = null,
): PrimarySide => ({ current, history, bitmapUuid });
const S = (
  current: string,
  history: string[] = [],
  extra: Partial<SecondarySide> = {},
): SecondarySide => ({
  current,
  history,
  role: 'secondary',
  ...extra,
});

describe('generation comparison on connect', () => {
  it('baselines a copy that was never complete', () => {
    expect(decideResync(P('c1'), S(ZERO_GENERATION))).toEqual({ kind: 'baseline' });
  });
  it('resyncs from the bitmap when both are at the same generation', () => {
    expect(decideResync(P('c1'), S('c1'))).toEqual({ kind: 'bitmap' });
  });
  it('resyncs from the bitmap when the peer is where the bitmap started', () => {
    expect(decideResync(P('c2', ['c1'], 'c1'), S('c1'))).toEqual({ kind: 'bitmap' });
  });
  it('falls back to a checksum resync when the peer is an older ancestor', () => {
    expect(decideResync(P('c3', ['c2', 'c1'], 'c2'), S('c1'))).toMatchObject({ kind: 'full' });
  });
  it('refuses when the peer is newer (it was primary after us)', () => {
    expect(decideResync(P('c1'), S('c2', ['c1']))).toMatchObject({
      kind: 'refuse',
      condition: 'PeerIsNewer',
    });
  });
  it('declares split brain when both changed since they agreed', () => {
    expect(decideResync(P('a2', ['c1'], 'c1'), S('b2', ['c1']))).toMatchObject({
      kind: 'refuse',
      condition: 'SplitBrain',
    });
  });
  it('refuses two primaries', () => {
    expect(decideResync(P('c1'), S('c1', [], { role: 'primary' }))).toMatchObject({
      kind: 'refuse',
      condition: 'PeerIsPrimary',
    });
  });
  it('keeps a bounded history, newest first', () => {
    let g = { current: 'g0', history: [] as string[] };
    for (let i = 1; i <= 12; i++) g = advance(g, `g${i}`);
    expect(g.current).toBe('g12');
    expect(g.history).toEqual(['g11', 'g10', 'g9', 'g8', 'g7', 'g6', 'g5', 'g4']);
  });
});
