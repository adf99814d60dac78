// `lockstep ctl move`: moves the primary of a volume, or of a group's volumes, to another agent
// while the workload runs (lib/group-move.ts), printing each phase and its progress. It is run
// against the current primary; interrupted, running it again finishes the move.
import { withClientTransport } from '../transport-flags';
import { Command } from 'commander';
import { AgentClient } from '../../lib/agent-client';
import { LockstepError } from '../../lib/errors';
import { stepMove, type MoveLink, type MoveProgress, type MoveSpec } from '../../lib/group-move';
import { formatSize } from '../../lib/size';
import { outputOption, printJson, type OutputFormat } from '../output';

interface MoveOptions {
  group?: string;
  to: string;
  keepSource: boolean;
  interval: string;
  output: OutputFormat;
}

export function moveCommand(): Command {
  return new Command('move')
    .argument('[volume]', 'the volume to move (or --group)')
    .description(
      'move the primary to another agent: establish a copy there by snapshots while writes go on, ' +
        'switch over, and re-point the other replicas (resynced from a common snapshot)',
    )
    .option('--group <group>', 'move every volume of this group together')
    .requiredOption('--to <host:port>', 'the agent that becomes primary, as the agents reach it')
    .option('--keep-source', 'keep this copy, as a replica of the new primary', false)
    .option('--interval <seconds>', 'how often progress is read', '1')
    .addOption(outputOption())
    .action(async (volume: string | undefined, opts: MoveOptions, cmd: Command) => {
      if (!volume === !opts.group) cmd.error('error: name one volume, or a group with --group');
      const globals = cmd.optsWithGlobals<{ agent: string; timeout: string }>();
      const timeoutMs = Number(globals.timeout) * 1000;
      await withClientTransport(cmd, async (transport) => {
        const from = new AgentClient(globals.agent, transport, timeoutMs);
        const to = new AgentClient(opts.to, transport, timeoutMs, '--to');
        try {
          const spec: MoveSpec = {
            volumes: volume ? [volume] : await groupVolumes(from, to, opts.group!),
            group: opts.group,
            from,
            fromAddress: (await from.info()).address,
            to,
            toAddress: opts.to,
            keepSource: opts.keepSource,
          };
          const done = await drive(spec, Number(opts.interval) * 1000, opts.output === 'table');
          if (opts.output === 'json') printJson(done);
        } finally {
          from.close();
          to.close();
        }
      });
    });
}

/** The group's members: on the old primary, or on the new one once the group has moved. */
async function groupVolumes(from: AgentClient, to: AgentClient, name: string): Promise<string[]> {
  for (const agent of [from, to]) {
    const group = (await agent.listGroups()).find((g) => g.name === name);
    if (group) return group.volumes;
  }
  throw new LockstepError(
    'LOCKSTEP_ERR_GROUP_NOT_FOUND',
    `group ${name} exists neither on ${from.target} nor on ${to.target}`,
  );
}

async function drive(spec: MoveSpec, intervalMs: number, tell: boolean): Promise<MoveProgress> {
  const say = (line: string) => tell && process.stdout.write(line + '\n');
  let last = '';
  let lastAt = 0;
  // Reported at the end too (-o json): the step that switched over is rarely the last one.
  let switchedOver: MoveProgress['switchedOver'];
  for (;;) {
    const p = await stepMove(spec);
    if (p.switchedOver) {
      switchedOver = p.switchedOver;
      say(
        `switched over: ${spec.toAddress} is primary (writes held ${p.switchedOver.holdMs.toFixed(1)} ms)`,
      );
    }
    if (p.phase === 'Done') {
      say(
        `moved: ${spec.toAddress} is primary of ${spec.volumes.join(', ')}; ${replicas(p.links)}`,
      );
      return { ...p, switchedOver };
    }
    const line = describe(p);
    // A line when something changed, else one every 10 s to show it is alive.
    const shape = `${p.phase} ${p.links.map((l) => `${l.state}/${l.kind}`).join(',')}`;
    if (shape !== last || Date.now() - lastAt >= 10_000) {
      say(line);
      last = shape;
      lastAt = Date.now();
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

function describe(p: MoveProgress): string {
  const each = p.links
    .map((l) => `${l.volume}→${l.peer} ${l.state}${l.kind ? ` ${l.kind} ${percent(l)}` : ''}`)
    .join(', ');
  const total =
    p.totalBytes > 0
      ? ` — ${formatSize(p.doneBytes)} of ${formatSize(p.totalBytes)}${p.etaSeconds >= 0 ? `, ETA ${p.etaSeconds} s` : ''}`
      : '';
  return `${p.phase.toLowerCase()}: ${each}${total}${p.note ? ` (${p.note})` : ''}`;
}

function percent(l: MoveLink): string {
  return l.totalBytes > 0 ? `${Math.floor((100 * l.doneBytes) / l.totalBytes)}%` : '';
}

function replicas(links: MoveLink[]): string {
  if (links.length === 0) return 'no other replica';
  const peers = [...new Set(links.map((l) => l.peer))];
  return `in sync: ${peers.join(', ')}`;
}
