// `switchover` and `failover`: which copy is primary, written as intent into spec.primary for
// the operator to carry out, as a person editing the object would. A switchover is planned:
// every copy in sync, nothing lost, writes held for milliseconds. A failover is for a primary
// that is gone: only through the relationship's mediator, which grants the epoch to a copy
// that holds every acknowledged write, and is recorded as the last failover.
import { Command } from 'commander';
import { LockstepError } from '../../lib/errors';
import {
  FAILOVER_ANNOTATION,
  type LastFailover,
  type SyncRelationship,
} from '../../operator/src/api/types';
import { outputOption, printJson } from '../output';
import { target } from './cluster';

function sides(r: SyncRelationship): string[] {
  return [r.spec.source.node, ...r.spec.targets.flatMap((t) => (t.node ? [t.node] : []))];
}

function refuse(message: string): never {
  throw new LockstepError('LOCKSTEP_ERR_NOT_ALLOWED', message);
}

async function choose(cmd: Command, name: string, to: string) {
  const { cluster, namespace } = target(cmd);
  const rel = await cluster.get<SyncRelationship>('syncrelationships', namespace, name);
  if (!sides(rel).includes(to))
    refuse(`${to} holds no copy of ${namespace}/${name} (its copies: ${sides(rel).join(', ')})`);
  const current = rel.status?.primaryNode ?? rel.spec.source.node;
  if (current === to) refuse(`${to} is already the primary of ${namespace}/${name}`);
  return { cluster, namespace, rel, current, primary: to === rel.spec.source.node ? 'source' : to };
}

export function primaryCommands(): Command[] {
  const switchover = new Command('switchover')
    .description('make another copy primary, with nothing lost (every copy must be in sync)')
    .argument('<relationship>', 'SyncRelationship')
    .requiredOption('--to <node>', 'the node whose copy becomes primary')
    .addOption(outputOption())
    .action(async (name: string, opts: { to: string; output: string }, cmd: Command) => {
      const { cluster, namespace, rel, current, primary } = await choose(cmd, name, opts.to);
      if (rel.status?.phase !== 'InSync')
        refuse(
          `${namespace}/${name} is ${rel.status?.phase ?? 'Pending'}: a switchover needs every copy in sync ` +
            `(if the primary is lost, use failover)`,
        );
      await cluster.patch('syncrelationships', namespace, name, { spec: { primary } });
      if (opts.output === 'json')
        return printJson({ relationship: name, from: current, to: opts.to });
      process.stdout.write(
        `switching ${namespace}/${name} from ${current} to ${opts.to}; follow it with: kubectl lockstep wait ${name}\n`,
      );
    });
  const failover = new Command('failover')
    .description('promote a replica because the primary is lost (through the mediator)')
    .argument('<relationship>', 'SyncRelationship')
    .requiredOption('--to <node>', 'the node whose copy becomes primary')
    .addOption(outputOption())
    .action(async (name: string, opts: { to: string; output: string }, cmd: Command) => {
      const { cluster, namespace, rel, current, primary } = await choose(cmd, name, opts.to);
      if (!rel.spec.failover?.mediator)
        refuse(
          `${namespace}/${name} has no mediator: nothing can tell whether ${opts.to} holds every ` +
            `acknowledged write. If you know the primary is gone for good: lockstep ctl promote --force`,
        );
      const record: LastFailover = {
        fromNode: current,
        toNode: opts.to,
        epoch: 0,
        startTime: new Date().toISOString(),
        reason: 'requested with kubectl lockstep failover',
      };
      await cluster.patch('syncrelationships', namespace, name, {
        metadata: {
          resourceVersion: rel.metadata.resourceVersion,
          annotations: { [FAILOVER_ANNOTATION]: JSON.stringify(record) },
        },
        spec: { primary },
      });
      if (opts.output === 'json') return printJson({ relationship: name, ...record });
      process.stdout.write(
        `failing ${namespace}/${name} over from ${current} to ${opts.to} (the mediator grants it only if ` +
          `${opts.to} holds every acknowledged write); follow it with: kubectl lockstep status ${name}\n`,
      );
    });
  return [switchover, failover];
}
