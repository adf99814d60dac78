// Generation identifiers, the DRBD model: every copy of a volume carries a current UUID (C) and
// a history of the ones before it; a primary also keeps, per peer, a bitmap UUID (B) — the C it
// had when it started recording that peer's missed writes in a dirty bitmap. Comparing them on
// connect says, without reading any data, whether the copies agree, which one is ahead and
// whether a bitmap can bring the other up to date — or whether both wrote independently.

export interface Generations {
  current: string;
  /** Earlier current UUIDs, newest first. */
  history: string[];
}

export interface PrimarySide extends Generations {
  /** C at the moment this primary started tracking the peer in a bitmap; null while in sync. */
  bitmapUuid: string | null;
}

export interface SecondarySide extends Generations {
  role: 'primary' | 'secondary';
}

/** The generation of a copy that has never been complete (new, or baseline not finished). */
export const ZERO_GENERATION = '00000000-0000-0000-0000-000000000000';

export type ResyncDecision =
  /** A copy that was never complete: send every region (zero runs as ZERO ops, not data). */
  | { kind: 'baseline' }
  /** Same lineage and the primary's bitmap covers every difference: send its dirty regions. */
  | { kind: 'bitmap' }
  /** The peer is an ancestor, but no bitmap covers the gap: compare checksums, send what differs. */
  | { kind: 'full'; reason: string }
  /** Not resolvable from this side; reported, never resolved silently. */
  | { kind: 'refuse'; condition: 'PeerIsPrimary' | 'PeerIsNewer' | 'SplitBrain'; reason: string };

export const HISTORY_LIMIT = 8;

/** What a primary does with a secondary it has just reached. */
export function decideResync(primary: PrimarySide, secondary: SecondarySide): ResyncDecision {
  if (secondary.role === 'primary') {
    return {
      kind: 'refuse',
      condition: 'PeerIsPrimary',
      reason: 'the peer is a primary too; demote one side before they can connect',
    };
  }
  if (secondary.current === ZERO_GENERATION) return { kind: 'baseline' };
  if (secondary.current === primary.current) return { kind: 'bitmap' };
  if (primary.bitmapUuid !== null && secondary.current === primary.bitmapUuid)
    return { kind: 'bitmap' };
  if (primary.history.includes(secondary.current)) {
    return { kind: 'full', reason: 'the peer is behind by more than the dirty bitmap records' };
  }
  if (secondary.history.includes(primary.current)) {
    return {
      kind: 'refuse',
      condition: 'PeerIsNewer',
      reason: 'the peer holds writes made after this copy was last primary; promote it instead',
    };
  }
  return {
    kind: 'refuse',
    condition: 'SplitBrain',
    reason:
      'both copies changed independently since they last agreed (split brain); ' +
      'choose the survivor and resync the other with --discard-peer',
  };
}

/** A new current UUID: the old one moves into the (bounded) history. */
export function advance(gen: Generations, next: string): Generations {
  return { current: next, history: [gen.current, ...gen.history].slice(0, HISTORY_LIMIT) };
}
