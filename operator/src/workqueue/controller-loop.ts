// Workers that drain a WorkQueue into a reconcile function, with controller-runtime's contract:
// a reconcile returns (done), returns { requeueAfterMs } (look again later), or throws (retry
// with per-key backoff). It never sleeps or loops itself, and the queue guarantees one key is
// never reconciled by two workers at once.
import type { Logger } from '../../../lib/logger';
import type { ControllerMetrics, ReconcileOutcome } from '../metrics';
import type { WorkQueue } from './work-queue';

export type ReconcileResult = { requeueAfterMs?: number } | void;

export interface ControllerLoopOptions {
  name: string;
  workers: number;
  log: Logger;
  metrics?: ControllerMetrics;
}

/** Resolves once `queue.shutDown()` has been called and every in-flight reconcile has finished. */
export async function runControllerLoop(
  queue: WorkQueue,
  reconcile: (key: string) => Promise<ReconcileResult>,
  options: ControllerLoopOptions,
): Promise<void> {
  const log = options.log.child({ controller: options.name });
  const recorder = options.metrics?.controller(options.name);
  const untrack = options.metrics?.trackQueue(options.name, () => queue.length);

  const worker = async (): Promise<void> => {
    for (;;) {
      const key = await queue.get();
      if (key === undefined) return;
      const started = process.hrtime.bigint();
      let outcome: ReconcileOutcome;
      try {
        const result = await reconcile(key);
        queue.forget(key);
        if (result?.requeueAfterMs !== undefined) {
          queue.addAfter(key, result.requeueAfterMs);
          outcome = 'requeue_after';
        } else {
          outcome = 'success';
        }
      } catch (err) {
        queue.addRateLimited(key);
        outcome = 'error';
        log.error(
          {
            key,
            err: err instanceof Error ? err.message : String(err),
            failures: queue.failures(key),
          },
          'reconcile failed; will retry with backoff',
        );
      } finally {
        // After the re-adds above, so a retry that fires early waits for this pass to finish.
        queue.done(key);
      }
      recorder?.reconciled(outcome, Number(process.hrtime.bigint() - started) / 1e9);
    }
  };

  try {
    await Promise.all(Array.from({ length: Math.max(1, options.workers) }, worker));
  } finally {
    untrack?.();
  }
}
