// Which async ops are still on their way to the peers, per region. Async mode acknowledges a
// write, and unlocks its regions, once it is on the local copy; its op to the peers may still
// be in flight. Async ops keep their order by travelling on one lane that the peer applies in
// order, but anything sent another way must wait for them: a resync copy of the region, a
// FLUSH, or a write after the mode changed (those go over every lane, applied concurrently).
// Only regions with such an op are held here: sync and strict-sync writes keep their regions
// locked until the peers have them, and never need it.
export class PeerOrder {
  private readonly pending = new Map<number, Promise<void>>();

  /** Settles once every op recorded on regions [first, last] has; undefined if there is none. */
  after(first: number, last: number): Promise<void> | undefined {
    if (this.pending.size === 0) return undefined;
    let found: Promise<void>[] | undefined;
    for (let r = first; r <= last; r++) {
      const op = this.pending.get(r);
      if (op && !found?.includes(op)) (found ??= []).push(op);
    }
    if (!found) return undefined;
    return found.length === 1 ? found[0] : Promise.all(found).then(() => undefined);
  }

  /** Records `op` (it must never reject) as the latest on regions [first, last]. */
  record(first: number, last: number, op: Promise<void>): void {
    for (let r = first; r <= last; r++) this.pending.set(r, op);
    void op.then(() => {
      for (let r = first; r <= last; r++) if (this.pending.get(r) === op) this.pending.delete(r);
    });
  }

  /** Settles once every op recorded so far has; undefined if there is none. */
  all(): Promise<void> | undefined {
    if (this.pending.size === 0) return undefined;
    return Promise.all(new Set(this.pending.values())).then(() => undefined);
  }
}
