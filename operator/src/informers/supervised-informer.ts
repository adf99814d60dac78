// A client-node informer (ListWatch) under supervision. On its own, a ListWatch stops for good
// when a list or watch fails (it emits 'error' and never retries), and a watch whose connection
// went silent (a half-open TCP link: client-node sets no watch timeout) stalls forever without
// any error (kubernetes-client/javascript #596, #680, #958). So every attempt here is a fresh
// ListWatch; a failed or quiet one is discarded and a new one lists again after a jittered
// backoff. The cache is ours, not the ListWatch's: it survives restarts, and each relist is
// diffed against it, so objects deleted while we were disconnected are removed (and reported),
// and only real changes reach the handlers.
import {
  makeInformer,
  type Informer,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
} from '@kubernetes/client-node';
import type { Logger } from '../../../lib/logger';
import type { ControllerMetrics, InformerRecorder, InformerRestartReason } from '../metrics';
import { backoffDelayMs } from '../workqueue/work-queue';

export interface SupervisedInformerOptions<T extends KubernetesObject> {
  kc: KubeConfig;
  /** For logs and metrics, e.g. 'syncrelationships'. */
  resource: string;
  /** e.g. '/apis/lockstep.dev/v1alpha1/syncrelationships', '/api/v1/namespaces/ns/configmaps'. */
  path: string;
  /** Lists what `path` and `labelSelector` select; the watch starts from its resourceVersion. */
  list: () => Promise<KubernetesListObject<T>>;
  labelSelector?: string;
  /** Called for each change to the cache. Handlers only enqueue keys; throwing is logged. */
  onChange: (obj: T, kind: 'add' | 'update' | 'delete') => void;
  log: Logger;
  metrics?: ControllerMetrics;
  /** Delay before restarting after an error: doubles per consecutive failure. 500..30_000. */
  restartBackoffMs?: { min: number; max: number };
  /** Relist when nothing has been heard for this long (a stalled watch looks just like this). */
  resyncIfQuietMs?: number;
}

export class StoppedBeforeSyncError extends Error {
  readonly code = 'LOCKSTEP_ERR_INFORMER_STOPPED';
  constructor(resource: string) {
    super(`the ${resource} informer was stopped before its first list completed`);
  }
}

export class SupervisedInformer<T extends KubernetesObject> {
  private readonly log: Logger;
  private readonly recorder: InformerRecorder | undefined;
  private readonly backoff: { min: number; max: number };
  private readonly quietMs: number;
  /** namespace ('' for cluster-scoped) → name → object. */
  private readonly objects = new Map<string, Map<string, T>>();
  /** Bumped per attempt; callbacks of a discarded ListWatch see a stale number and do nothing. */
  private generation = 0;
  private informer: Informer<T> | undefined;
  private attemptStartedAt = 0;
  private failuresInARow = 0;
  private lastHeardAt = 0;
  private quietTimer: NodeJS.Timeout | undefined;
  private restartTimer: NodeJS.Timeout | undefined;
  private state: 'new' | 'running' | 'stopped' = 'new';
  private hasSynced = false;
  private restartCount = 0;
  private readonly firstSync: Promise<void>;
  private resolveFirstSync!: () => void;
  private rejectFirstSync!: (err: Error) => void;

  constructor(private readonly options: SupervisedInformerOptions<T>) {
    this.log = options.log.child({ informer: options.resource });
    this.recorder = options.metrics?.informer(options.resource);
    this.backoff = options.restartBackoffMs ?? { min: 500, max: 30_000 };
    this.quietMs = options.resyncIfQuietMs ?? 5 * 60_000;
    this.firstSync = new Promise<void>((resolve, reject) => {
      this.resolveFirstSync = resolve;
      this.rejectFirstSync = reject;
    });
    // start() may never be awaited if stop() comes first; that is not an unhandled rejection.
    this.firstSync.catch(() => {});
  }

  get synced(): boolean {
    return this.hasSynced;
  }

  get restarts(): number {
    return this.restartCount;
  }

  /** Resolves once the first list is in the cache; rejects if stop() comes first. */
  start(): Promise<void> {
    if (this.state === 'new') {
      this.state = 'running';
      this.begin();
    }
    return this.firstSync;
  }

  async stop(): Promise<void> {
    if (this.state === 'stopped') return;
    this.state = 'stopped';
    this.generation++;
    clearTimeout(this.quietTimer);
    clearTimeout(this.restartTimer);
    if (!this.hasSynced) this.rejectFirstSync(new StoppedBeforeSyncError(this.options.resource));
    const informer = this.informer;
    this.informer = undefined;
    await informer?.stop();
  }

  list(namespace?: string): T[] {
    if (namespace === undefined) return [...this.objects.values()].flatMap((m) => [...m.values()]);
    return [...(this.objects.get(namespace)?.values() ?? [])];
  }

  get(name: string, namespace?: string): T | undefined {
    return this.objects.get(namespace ?? '')?.get(name);
  }

  private begin(): void {
    const generation = ++this.generation;
    const current = () => generation === this.generation;
    const { kc, path, labelSelector } = this.options;
    const informer = makeInformer<T>(
      kc,
      path,
      async () => {
        const list = await this.options.list();
        // Throwing stops a discarded ListWatch here; returning would let it open a watch that
        // nobody listens to.
        if (!current()) throw new Error('superseded');
        this.replaceAll(list.items);
        return list;
      },
      labelSelector,
    );
    informer.on('add', (obj) => current() && this.upsert(obj));
    informer.on('update', (obj) => current() && this.upsert(obj));
    informer.on('delete', (obj) => current() && this.remove(obj));
    informer.on('error', (err) => current() && this.restart('error', err));
    this.informer = informer;
    this.attemptStartedAt = Date.now();
    this.heard();
    this.armQuietTimer();
    informer.start().catch((err: unknown) => current() && this.restart('error', err));
  }

  private restart(reason: InformerRestartReason, err?: unknown): void {
    if (this.state !== 'running') return;
    this.generation++;
    clearTimeout(this.quietTimer);
    const informer = this.informer;
    this.informer = undefined;
    informer?.stop().catch(() => {});
    this.restartCount++;
    this.recorder?.restarted(reason);
    let delayMs = 0;
    if (reason === 'error') {
      // An attempt that stayed up longer than the longest backoff shows the last trouble was
      // over: start again from the shortest delay instead of waiting the maximum forever.
      if (Date.now() - this.attemptStartedAt > this.backoff.max) this.failuresInARow = 0;
      delayMs = backoffDelayMs(this.failuresInARow++, this.backoff.min, this.backoff.max);
      this.log.warn(
        { err: describe(err), restarts: this.restartCount, delayMs: Math.round(delayMs) },
        'list-watch failed; restarting',
      );
    } else {
      this.log.info(
        { quietMs: this.quietMs, restarts: this.restartCount },
        'no events for a while; relisting in case the watch stalled',
      );
    }
    this.restartTimer = setTimeout(() => this.begin(), delayMs);
  }

  private heard(): void {
    this.lastHeardAt = Date.now();
  }

  /** One timer per attempt, re-armed lazily: events only stamp a time, they never touch timers. */
  private armQuietTimer(): void {
    const generation = this.generation;
    const due = this.lastHeardAt + this.quietMs - Date.now();
    this.quietTimer = setTimeout(
      () => {
        if (generation !== this.generation) return;
        if (Date.now() - this.lastHeardAt >= this.quietMs) this.restart('quiet');
        else this.armQuietTimer();
      },
      Math.max(0, due),
    );
  }

  /** A fresh list is the truth: whatever the cache holds that the list lacks was deleted. */
  private replaceAll(items: T[]): void {
    this.heard();
    const listed = new Set(items.map((o) => `${o.metadata?.namespace ?? ''}/${o.metadata?.name}`));
    for (const [namespace, byName] of this.objects) {
      for (const [name, obj] of byName) {
        if (!listed.has(`${namespace}/${name}`)) this.remove(obj);
      }
    }
    for (const obj of items) this.upsert(obj);
    if (!this.hasSynced) {
      this.hasSynced = true;
      this.log.info({ objects: items.length }, 'synced');
      this.resolveFirstSync();
    }
  }

  private upsert(obj: T): void {
    this.heard();
    const namespace = obj.metadata?.namespace ?? '';
    const name = obj.metadata?.name ?? '';
    let byName = this.objects.get(namespace);
    if (!byName) this.objects.set(namespace, (byName = new Map<string, T>()));
    const old = byName.get(name);
    // Relists and re-watches deliver objects we already hold; only a new version is a change.
    if (old && old.metadata?.resourceVersion === obj.metadata?.resourceVersion) return;
    byName.set(name, obj);
    this.emit(obj, old ? 'update' : 'add');
  }

  private remove(obj: T): void {
    this.heard();
    const namespace = obj.metadata?.namespace ?? '';
    const byName = this.objects.get(namespace);
    if (!byName?.delete(obj.metadata?.name ?? '')) return;
    if (byName.size === 0) this.objects.delete(namespace);
    this.emit(obj, 'delete');
  }

  private emit(obj: T, kind: 'add' | 'update' | 'delete'): void {
    this.recorder?.event(kind);
    try {
      this.options.onChange(obj, kind);
    } catch (err) {
      // A throwing handler must not break the cache, or the ListWatch's stream parser, which
      // would swallow the exception and drop the event.
      this.log.error(
        {
          err: describe(err),
          kind,
          object: `${obj.metadata?.namespace ?? ''}/${obj.metadata?.name}`,
        },
        'informer handler threw',
      );
    }
  }
}

function describe(err: unknown): string {
  if (err instanceof Error) return err.message;
  if (err && typeof err === 'object' && 'message' in err) return String(err.message);
  return String(err);
}
