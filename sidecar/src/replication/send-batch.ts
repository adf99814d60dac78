// One turn of the event loop's sends to the peers, and what must follow them. Everything sent
// during a turn (a socket read's worth of NBD requests, say) leaves in one write per lane when
// the turn's synchronous work is done. The primary's local write of those requests must start
// only after that write: the round trip to the replica and its write then overlap ours instead
// of following every local write of the batch. That order is this class's contract — flushes
// first, then the work queued with `afterSend` — not a coincidence of two files each calling
// process.nextTick.
export class SendBatch {
  private flushers = new Set<() => void>();
  private after: (() => void)[] = [];
  private scheduled = false;
  private readonly run = () => {
    this.scheduled = false;
    const flushers = this.flushers;
    const after = this.after;
    // Swapped, not cleared in place: a flusher or a queued op may start the next batch.
    this.flushers = new Set();
    this.after = [];
    for (const flush of flushers) flush();
    for (const op of after) op();
  };

  /** `flush` (one call per batch, however often it is named) runs at the end of this turn. */
  send(flush: () => void): void {
    this.flushers.add(flush);
    this.schedule();
  }

  /** Starts `op` once this turn's batch has been written to the peers. */
  afterSend(op: () => Promise<void>): Promise<void> {
    return new Promise((resolve, reject) => {
      this.after.push(() => void op().then(resolve, reject));
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    process.nextTick(this.run);
  }
}
