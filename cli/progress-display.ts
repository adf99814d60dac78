// Progress of a long copy (a baseline, a resync, a move), shown while a command waits for it.
// On a terminal: one live bar with the bytes done, the total and the ETA. Otherwise (a pipe, a
// log): a line whenever the state or the whole percent changes, so logs stay readable.
import { SingleBar } from 'cli-progress';
import { formatDuration } from '../lib/duration';
import { formatSize } from '../lib/size';

export interface Progress {
  /** What is going on, e.g. a phase or a peer's state. */
  state: string;
  doneBytes: number;
  totalBytes: number;
  /** -1: unknown. */
  etaSeconds: number;
}

export interface ProgressDisplay {
  update(p: Progress): void;
  /** The wait is over: the bar is drawn full, and left on screen. */
  stop(): void;
}

/** Whole seconds as a duration ("1m30s"); a negative estimate is unknown ("?"). */
export function formatEta(seconds: number): string {
  if (seconds < 0) return '?';
  return seconds < 0.5 ? '0s' : formatDuration(Math.round(seconds) * 1000);
}

/** A bar on a terminal (`stream.isTTY`), lines on stderr otherwise. */
export function progressDisplay(label: string, stream: NodeJS.WriteStream): ProgressDisplay {
  return stream.isTTY ? barDisplay(label, stream) : lineDisplay(label);
}

function lineDisplay(label: string): ProgressDisplay {
  let last = '';
  return {
    update(p) {
      const line =
        p.totalBytes > 0
          ? `${label}: ${p.state} ${Math.floor((100 * p.doneBytes) / p.totalBytes)}% (${formatSize(p.doneBytes)} of ${formatSize(p.totalBytes)}, ETA ${formatEta(p.etaSeconds)})`
          : `${label}: ${p.state}`;
      if (line !== last) process.stderr.write(`${line}\n`);
      last = line;
    },
    stop() {},
  };
}

function barDisplay(label: string, stream: NodeJS.WriteStream): ProgressDisplay {
  // Payload keys must not be the bar's own tokens (total, value, eta...), which it fills itself.
  const bar = new SingleBar({
    format: `${label} {state} [{bar}] {percentage}% | {done_text} of {total_text} | ETA {eta_text}`,
    barCompleteChar: '#',
    barIncompleteChar: '.',
    hideCursor: true,
    stream,
  });
  let started = false;
  const payload = (p: Progress) => ({
    state: p.state.padEnd(10),
    done_text: formatSize(p.doneBytes),
    total_text: formatSize(p.totalBytes),
    eta_text: p.totalBytes > 0 ? formatEta(p.etaSeconds) : '?',
  });
  return {
    update(p) {
      const total = Math.max(1, p.totalBytes);
      if (!started) bar.start(total, 0, payload(p));
      started = true;
      bar.setTotal(total);
      bar.update(p.doneBytes, payload(p));
    },
    stop() {
      if (!started) return;
      started = false;
      bar.update(bar.getTotal());
      bar.stop();
    },
  };
}
