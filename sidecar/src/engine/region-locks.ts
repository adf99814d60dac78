// Region locks: a write holds the regions it touches until every copy has it (an async write:
// until the local copy has it, see PeerOrder for the peers), so an overlapping write waits and
// dependent writes reach every copy in the order they arrived; the resync
// scanner holds a region while it copies it, so no live write can interleave with the copy.
// Waiters are served strictly in arrival order among those that overlap.

interface Waiter {
  first: number;
  last: number;
  grant: () => void;
}

export class RegionLocks {
  private readonly held = new Set<number>();
  private readonly waiters: Waiter[] = [];

  get heldCount(): number {
    return this.held.size;
  }

  /** Takes regions [first, last]; undefined if granted at once, else a promise of the grant. */
  acquire(first: number, last: number): Promise<void> | undefined {
    // Free regions are taken at once unless an earlier waiter wants one of them.
    if (this.free(first, last) && !this.waiters.some((w) => w.first <= last && first <= w.last)) {
      this.take(first, last);
      return undefined;
    }
    return new Promise((grant) => this.waiters.push({ first, last, grant }));
  }

  release(first: number, last: number): void {
    for (let r = first; r <= last; r++) this.held.delete(r);
    if (this.waiters.length > 0) this.grantWaiting();
  }

  private free(first: number, last: number): boolean {
    for (let r = first; r <= last; r++) if (this.held.has(r)) return false;
    return true;
  }

  private take(first: number, last: number): void {
    for (let r = first; r <= last; r++) this.held.add(r);
  }

  private grantWaiting(): void {
    // A waiter may go ahead of earlier ones only if it overlaps none of them.
    const blocked: Waiter[] = [];
    for (let i = 0; i < this.waiters.length;) {
      const w = this.waiters[i];
      const behind = blocked.some((b) => b.first <= w.last && w.first <= b.last);
      if (!behind && this.free(w.first, w.last)) {
        this.take(w.first, w.last);
        this.waiters.splice(i, 1);
        w.grant();
      } else {
        blocked.push(w);
        i++;
      }
    }
  }
}
