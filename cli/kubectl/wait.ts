// `kubectl lockstep wait RELATIONSHIP --for=InSync`: until the relationship reaches a phase. On a
// terminal it draws a progress bar of what is being copied (a baseline, a resync, a move) with
// its rate and ETA; otherwise it prints a line whenever the phase or progress changes, for logs.
import { Command, Option } from 'commander';
import { SingleBar } from 'cli-progress';
import { LockstepError } from '../../lib/errors';
import { parseDuration } from '../../lib/duration';
import { formatSize } from '../../lib/size';
import { RELATIONSHIP_PHASES, type SyncRelationship } from '../../operator/src/api/types';
import { outputOption, printJson } from '../output';
import { target } from './cluster';
import { formatEta, viewOf, type RelationshipView } from './relationship-view';

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
        const show =
          process.stdout.isTTY && opts.output !== 'json' ? barDisplay(name) : lineDisplay(name);
        try {
          for (;;) {
            const v = viewOf(
              await cluster.get<SyncRelationship>('syncrelationships', namespace, name),
            );
            if (v.phase === opts.for) {
              show.done(v);
              if (opts.output === 'json') printJson(v);
              else process.stdout.write(`${namespace}/${name} is ${v.phase}\n`);
              return;
            }
            show.update(v);
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

interface Display {
  update(v: RelationshipView): void;
  done(v: RelationshipView): void;
  stop(): void;
}

function lineDisplay(name: string): Display {
  let last = '';
  return {
    update(v) {
      const p = v.progress;
      const line =
        p && p.totalBytes > 0
          ? `${name}: ${v.phase} ${Math.floor((100 * p.doneBytes) / p.totalBytes)}% (${formatSize(p.doneBytes)} of ${formatSize(p.totalBytes)}, ETA ${formatEta(p.etaSeconds)})`
          : `${name}: ${v.phase}`;
      if (line !== last) process.stderr.write(`${line}\n`);
      last = line;
    },
    done() {},
    stop() {},
  };
}

function barDisplay(name: string): Display {
  const bar = new SingleBar({
    format: `${name} {phase} [{bar}] {percentage}% | {done_text} of {total_text} | ETA {eta_text}`,
    barCompleteChar: '#',
    barIncompleteChar: '.',
    hideCursor: true,
    clearOnComplete: false,
    stream: process.stdout,
  });
  let started = false;
  const payload = (v: RelationshipView) => ({
    phase: v.phase.padEnd(10),
    done_text: formatSize(v.progress?.doneBytes ?? 0),
    total_text: formatSize(v.progress?.totalBytes ?? 0),
    eta_text: v.progress ? formatEta(v.progress.etaSeconds) : '?',
  });
  return {
    update(v) {
      const total = Math.max(1, v.progress?.totalBytes ?? 1);
      if (!started) bar.start(total, 0, payload(v));
      started = true;
      bar.setTotal(total);
      bar.update(v.progress?.doneBytes ?? 0, payload(v));
    },
    done(v) {
      if (!started) return;
      bar.update(bar.getTotal(), payload(v));
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
