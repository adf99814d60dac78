// What holds a relationship back until the world changes: an object that does not exist yet, an
// agent that is not ready, a volume the agents already serve from elsewhere. Its reason becomes
// the Ready condition's reason, and the relationship stays Pending until a later look.
//
// One exception class rather than a `Plan | Blocked` union: a missing prerequisite can turn up
// anywhere from resolving the spec down to an agent's answer several awaits deep (a volume
// already served from another path, no copy on the node to promote), and a union would have to
// be checked and handed up at every call on the way. Thrown where it is found and caught in one
// place, the reconcile, it leaves every step reading straight through.
export class Blocked extends Error {
  constructor(
    /** A condition reason: CamelCase, stable, for scripts and alerts to match. */
    readonly reason: string,
    message: string,
  ) {
    super(message);
    this.name = 'Blocked';
  }
}
