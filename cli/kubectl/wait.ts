// `kubectl lockstep wait RELATIONSHIP --for=InSync`: until the relationship reaches a phase,
// showing the progress of what is being copied (a baseline, a resync, a move) with its ETA: a
// live bar on a terminal, a line per change otherwise.
import { Command, Option } from 'commander';
import { LockstepError } from '../../lib/errors';
import { parseDuration } from '../../lib/duration';
import { RELATIONSHIP_PHASES, type SyncRelationship } from '../../operator/src/api/types';
import { outputOption, printJson } from '../output';
import { progressDisplay } from '../progress-display';
import { target } from './cluster';
import { viewOf } from './relationship-view';

const POLL_MS = 1000;

export function waitCommand(): Command {
  return new Command('wait')
    .description('wait until a relationship reaches a phase, with a live progress bar')
    .argument('<relationship>', 'SyncRelationship')
    .addOption(
      new Option('--for <phase>', 'the phase to wait for')
        .choices(RELATIONSHIP_PHASES)
        .default('InSync'),
    )
    .option('--timeout <duration>', 'give up after this long (exit 1)', '30m')
    .addOption(outputOption())
    .action(
      async (
        name: string,
        opts: { for: string; timeout: string; output: string },
        cmd: Command,
      ) => {
        const { cluster, namespace } = target(cmd);
        const deadline = Date.now() + parseDuration(opts.timeout, '--timeout');
        const show = progressDisplay(
          name,
          opts.output === 'json' ? process.stderr : process.stdout,
        );
        try {
          for (;;) {
            const v = viewOf(
              await cluster.get<SyncRelationship>('syncrelationships', namespace, name),
            );
            if (v.phase === opts.for) {
              show.stop();
              if (opts.output === 'json') printJson(v);
              else process.stdout.write(`${namespace}/${name} is ${v.phase}\n`);
              return;
            }
            show.update({
              state: v.phase,
              doneBytes: v.progress?.doneBytes ?? 0,
              totalBytes: v.progress?.totalBytes ?? 0,
              etaSeconds: v.progress?.etaSeconds ?? -1,
            });
            if (Date.now() >= deadline)
              throw new LockstepError(
                'LOCKSTEP_ERR_UNAVAILABLE',
                `timed out after ${opts.timeout}: ${namespace}/${name} is ${v.phase}, not ${opts.for}`,
              );
            await new Promise((r) => setTimeout(r, POLL_MS));
          }
        } finally {
          show.stop();
        }
      },
    );
}
