// One control-API client per agent endpoint, reused across reconciles and closed when the
// endpoint is no longer registered.
import { AgentClient } from '../../../lib/agent-client';
import type { Transport } from '../../../lib/tls/transport';

export class AgentPool {
  private readonly clients = new Map<string, AgentClient>();

  constructor(
    readonly transport: Transport,
    private readonly timeoutMs = 5_000,
  ) {}

  get(endpoint: string): AgentClient {
    let c = this.clients.get(endpoint);
    if (!c) {
      c = new AgentClient(endpoint, this.transport, this.timeoutMs);
      this.clients.set(endpoint, c);
    }
    return c;
  }

  /** Closes the clients of endpoints not in `keep`. */
  retain(keep: ReadonlySet<string>): void {
    for (const [endpoint, c] of this.clients) {
      if (!keep.has(endpoint)) {
        c.close();
        this.clients.delete(endpoint);
      }
    }
  }

  close(): void {
    this.retain(new Set());
  }
}
