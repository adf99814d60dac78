// `lockstep ctl failover` and `lockstep ctl epoch`: a failover asked for by hand, through the
// same compare-and-swap at the mediator that an automatic one makes (engine/failover.ts), and
// the epoch and who holds it, as the mediator records it and as this copy has seen it.
import { Command } from 'commander';
import { AgentClient, type VolumeInfo } from '../../lib/agent-client';
import { LockstepError, errorMessage } from '../../lib/errors';
import { MediatorClient } from '../../lib/mediator-client';
import type { Transport } from '../../lib/tls/transport';
import { outputOption, printJson, type OutputFormat } from '../output';
import { withClientTransport } from '../transport-flags';

function clientOf(cmd: Command, transport: Transport): AgentClient {
  const globals = cmd.optsWithGlobals<{ agent: string; timeout: string }>();
  return new AgentClient(globals.agent, transport, Number(globals.timeout) * 1000);
}

function mediatorOf(v: VolumeInfo): { address: string; group: string } {
  const p = v.replication?.protection;
  if (!p?.mediator)
    throw new LockstepError(
      'LOCKSTEP_ERR_NOT_ALLOWED',
      `volume ${v.name} has no mediator (split brain protection is off): use promote, with --force if its primary is gone`,
    );
  return { address: p.mediator, group: p.group };
}

/** The volumes `ctl failover` promotes: the one named, or every volume of `--group`. */
async function failoverVolumes(
  agent: AgentClient,
  volume: string | undefined,
  group: string | undefined,
): Promise<string[]> {
  if (!volume === !group)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      'name a volume or a consistency group (--group), not both',
    );
  if (volume) return [volume];
  const g = (await agent.listGroups()).find((x) => x.name === group);
  if (!g)
    throw new LockstepError(
      'LOCKSTEP_ERR_GROUP_NOT_FOUND',
      `this agent has no consistency group ${group}`,
    );
  return g.volumes;
}

export function failoverCommand(): Command {
  return new Command('failover')
    .argument('[volume]', 'the copy to make primary (run against its agent)')
    .option('--group <name>', 'every volume of this consistency group on the agent')
    .description(
      'make this replica the primary through the mediator: granted only if the mediator counts it ' +
        'as in sync, so nothing acknowledged is lost; the old primary is fenced by the new epoch',
    )
    .addOption(outputOption())
    .action(
      async (
        volume: string | undefined,
        opts: { output: OutputFormat; group?: string },
        cmd: Command,
      ) =>
        withClientTransport(cmd, async (transport) => {
          const agent = clientOf(cmd, transport);
          try {
            const names = await failoverVolumes(agent, volume, opts.group);
            // Every volume is checked before any is promoted: a group is not split by a typo.
            for (const name of names) mediatorOf(await agent.getVolume(name));
            const promoted = [];
            for (const name of names) {
              try {
                promoted.push(await agent.promote(name, false));
              } catch (err) {
                if (promoted.length === 0) throw err;
                throw new LockstepError(
                  'LOCKSTEP_ERR_NOT_ALLOWED',
                  `${promoted.map((p) => p.volume.name).join(', ')} became primary here, but ${name} was refused ` +
                    `(${errorMessage(err)}): the group's primaries are now on different agents; ` +
                    'promote the others where this one is primary, or this one with --force',
                );
              }
            }
            if (opts.output === 'json') return printJson(volume ? promoted[0] : promoted);
            for (const p of promoted) {
              const pr = p.volume.replication?.protection;
              process.stdout.write(
                `volume ${p.volume.name} is primary in epoch ${pr?.epoch ?? '?'}; connect the workload to ${p.volume.exportUri}\n`,
              );
            }
          } finally {
            agent.close();
          }
        }),
    );
}

export function epochCommand(): Command {
  return new Command('epoch')
    .argument('<volume>', 'the volume (run against any agent holding a copy)')
    .description('show the epoch: who holds it at the mediator, and what this copy has seen')
    .addOption(outputOption())
    .action((volume: string, opts: { output: OutputFormat }, cmd: Command) =>
      withClientTransport(cmd, async (transport) => {
        const agent = clientOf(cmd, transport);
        let mediator: MediatorClient | undefined;
        try {
          const v = await agent.getVolume(volume);
          const m = mediatorOf(v);
          mediator = new MediatorClient(m.address, transport);
          const record = await mediator.record(m.group);
          const p = v.replication!.protection!;
          const copy = {
            role: v.role,
            epoch: p.epoch,
            acceptsWrites: p.acceptsWrites,
            state: p.state,
            detail: p.detail,
          };
          if (opts.output === 'json') return printJson({ mediator: m.address, record, copy });
          process.stdout.write(
            `mediator:  ${m.address}, group ${record.group || m.group}\n` +
              `epoch:     ${record.epoch}` +
              (record.epoch > 0
                ? `, granted ${new Date(Number(record.grantedAtMs)).toISOString()}\n` +
                  `primary:   ${record.primary}\n` +
                  `in sync:   ${record.inSync.join(', ')}\n`
                : ' (never granted)\n') +
              `this copy: ${v.role}, epoch ${p.epoch}, ${p.acceptsWrites ? 'accepts writes' : 'does not accept writes'} (${p.state})\n` +
              (p.detail ? `           ${p.detail}\n` : ''),
          );
        } finally {
          mediator?.close();
          agent.close();
        }
      }),
    );
}
