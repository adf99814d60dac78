// The operator's Prometheus metrics, in a registry of its own (not prom-client's global one) so
// several operators in one test process, or an embedding program, never collide. Controllers and
// informers bind their label children once, at setup.
import client from 'prom-client';
import { registerProcessMetrics } from '../../lib/process-metrics';
import { setStates } from '../../lib/enum-gauge';
import { serveMetrics, type MetricsServer } from '../../lib/metrics-server';
import { RELATIONSHIP_PHASES, type SyncRelationship } from './api/types';

export type ReconcileOutcome = 'success' | 'error' | 'requeue_after';
export type InformerRestartReason = 'error' | 'quiet';
export type InformerEventKind = 'add' | 'update' | 'delete';

export interface ControllerRecorder {
  reconciled(outcome: ReconcileOutcome, seconds: number): void;
}

export interface InformerRecorder {
  restarted(reason: InformerRestartReason): void;
  event(kind: InformerEventKind): void;
}

export class ControllerMetrics {
  readonly registry = new client.Registry();
  private readonly reconciles: client.Counter;
  private readonly duration: client.Histogram;
  private readonly restarts: client.Counter;
  private readonly events: client.Counter;
  /** Failovers this replica's monitor started, by relationship (namespace/name) and outcome. */
  readonly failovers: client.Counter;
  /** How long each monitored relationship's primary has been lost (0: it is not). */
  readonly primaryLost: client.Gauge;
  /** Monitoring shards this replica holds. */
  readonly shardsHeld: client.Gauge;
  /** Agent certificate requests answered, by result (issued, denied, failed). */
  readonly certificatesIssued: client.Counter;
  /** Read at scrape time, so the gauge is exact without touching the queue's hot path. */
  private readonly queueLengths = new Map<string, () => number>();
  /** The relationships as the informer has them, read at scrape time. */
  private relationships: () => SyncRelationship[] = () => [];

  constructor() {
    const registers = [this.registry];
    registerProcessMetrics(this.registry, 'lockstep_operator_');
    const relationships = () => this.relationships();
    new client.Gauge({
      name: 'lockstep_operator_relationship_phase',
      help: `1 for the phase each SyncRelationship is in, 0 for the others (${RELATIONSHIP_PHASES.join(', ')}).`,
      labelNames: ['namespace', 'relationship', 'phase'],
      registers,
      collect() {
        this.reset();
        for (const r of relationships())
          setStates(
            this,
            { namespace: r.metadata?.namespace ?? '', relationship: r.metadata?.name ?? '' },
            'phase',
            RELATIONSHIP_PHASES,
            r.status?.phase ?? 'Pending',
          );
      },
    });
    new client.Gauge({
      name: 'lockstep_operator_relationship_dirty_bytes',
      help: 'Bytes the copies of each SyncRelationship are missing, as its status says.',
      labelNames: ['namespace', 'relationship'],
      registers,
      collect() {
        this.reset();
        for (const r of relationships())
          this.set(
            { namespace: r.metadata?.namespace ?? '', relationship: r.metadata?.name ?? '' },
            r.status?.dirtyBytes ?? 0,
          );
      },
    });
    this.reconciles = new client.Counter({
      name: 'lockstep_operator_reconcile_total',
      help: 'Reconciles finished, by controller and result (success, error, requeue_after).',
      labelNames: ['controller', 'result'],
      registers,
    });
    this.duration = new client.Histogram({
      name: 'lockstep_operator_reconcile_duration_seconds',
      help: 'Time spent in one reconcile, by controller.',
      labelNames: ['controller'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    const queueLengths = this.queueLengths;
    new client.Gauge({
      name: 'lockstep_operator_workqueue_depth',
      help: 'Keys waiting in a controller’s work queue (not counting those being reconciled).',
      labelNames: ['controller'],
      registers,
      collect() {
        this.reset();
        for (const [controller, length] of queueLengths) this.set({ controller }, length());
      },
    });
    this.restarts = new client.Counter({
      name: 'lockstep_operator_informer_restarts_total',
      help: 'Informer list-watch restarts, by resource and reason (error, or quiet for too long).',
      labelNames: ['resource', 'reason'],
      registers,
    });
    this.events = new client.Counter({
      name: 'lockstep_operator_informer_events_total',
      help: 'Changes delivered by informers to their handlers, by resource and kind.',
      labelNames: ['resource', 'kind'],
      registers,
    });
    this.certificatesIssued = new client.Counter({
      name: 'lockstep_operator_certificate_requests_total',
      help: 'Agent certificate requests answered, by result (issued, denied, failed).',
      labelNames: ['result'],
      registers,
    });
    this.failovers = new client.Counter({
      name: 'lockstep_operator_failovers_total',
      help: 'Failovers started by this replica, by relationship and kind (failover, adopted).',
      labelNames: ['relationship', 'kind'],
      registers,
    });
    this.primaryLost = new client.Gauge({
      name: 'lockstep_operator_primary_lost_seconds',
      help: 'How long a monitored relationship’s primary has been lost, as its replicas see it.',
      labelNames: ['relationship'],
      registers,
    });
    this.shardsHeld = new client.Gauge({
      name: 'lockstep_operator_monitor_shards',
      help: 'Monitoring shards this operator replica holds.',
      registers,
    });
  }

  /** Where the relationship gauges read from (the operator's informer). */
  watchRelationships(list: () => SyncRelationship[]): void {
    this.relationships = list;
  }

  controller(name: string): ControllerRecorder {
    const outcomes = {
      success: this.reconciles.labels(name, 'success'),
      error: this.reconciles.labels(name, 'error'),
      requeue_after: this.reconciles.labels(name, 'requeue_after'),
    };
    const seconds = this.duration.labels(name);
    return {
      reconciled(outcome, s) {
        outcomes[outcome].inc();
        seconds.observe(s);
      },
    };
  }

  /** Reports `length()` as the controller's queue depth until the returned function is called. */
  trackQueue(controller: string, length: () => number): () => void {
    this.queueLengths.set(controller, length);
    return () => {
      if (this.queueLengths.get(controller) === length) this.queueLengths.delete(controller);
    };
  }

  informer(resource: string): InformerRecorder {
    const restarts = {
      error: this.restarts.labels(resource, 'error'),
      quiet: this.restarts.labels(resource, 'quiet'),
    };
    const events = {
      add: this.events.labels(resource, 'add'),
      update: this.events.labels(resource, 'update'),
      delete: this.events.labels(resource, 'delete'),
    };
    return {
      restarted: (reason) => restarts[reason].inc(),
      event: (kind) => events[kind].inc(),
    };
  }

  serve(host: string, port: number, ready: () => boolean): Promise<MetricsServer> {
    return serveMetrics(this.registry, host, port, ready);
  }
}
