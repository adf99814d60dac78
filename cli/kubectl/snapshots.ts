// `snapshot create|list` and `verify`: ReplicatedSnapshots, a snapshot on every copy at one
// write-order point, made and read through the API; `verify` takes one that compares the
// copies' region hashes and waits for the verdict.
import { Command } from 'commander';
import { LockstepError } from '../../lib/errors';
import { parseDuration } from '../../lib/duration';
import type { ReplicatedSnapshot, SyncRelationship } from '../../operator/src/api/types';
import { outputOption, printJson, printTable } from '../output';
import { target } from './cluster';

/** The group a snapshot of `source` (a SyncRelationship, or a ConsistencyGroup) is of. */
async function groupOf(cmd: Command, source: string): Promise<string> {
  const { cluster, namespace } = target(cmd);
  try {
    return (await cluster.get<SyncRelationship>('syncrelationships', namespace, source)).spec
      .consistencyGroup;
  } catch {
    return source;
  }
}

function snapshotBody(
  name: string,
  group: string,
  label: string | undefined,
  verify: boolean,
): object {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'ReplicatedSnapshot',
    metadata: { name },
    spec: {
      source: { consistencyGroup: group },
      ...(label ? { label } : {}),
      ...(verify ? { verify } : {}),
    },
  };
}

const viewOf = (s: ReplicatedSnapshot) => ({
  name: s.metadata.name,
  group: s.spec.source.consistencyGroup ?? s.status?.consistencyGroup ?? '',
  pvc: s.spec.source.persistentVolumeClaimName ?? '',
  label: s.spec.label ?? '',
  phase: s.status?.phase ?? 'Pending',
  readyToUse: s.status?.readyToUse ?? false,
  copies: s.status?.copiesTaken ?? '',
  verification: s.status?.verification?.result ?? '',
  creationTime: s.status?.creationTime ?? '',
});

function snapshot(): Command {
  const cmd = new Command('snapshot').description(
    'ReplicatedSnapshots: on every copy at one write-order point',
  );
  cmd
    .command('create')
    .description('snapshot a relationship’s (or a consistency group’s) volumes on every copy')
    .argument('<source>', 'SyncRelationship or ConsistencyGroup')
    .argument('<name>', 'the ReplicatedSnapshot’s name')
    .option('--label <label>', 'a label (schedules keep snapshots per label)')
    .option('--verify', 'compare the copies’ region hashes once taken', false)
    .addOption(outputOption())
    .action(
      async (
        source: string,
        name: string,
        opts: { label?: string; verify: boolean; output: string },
        c: Command,
      ) => {
        const { cluster, namespace } = target(c);
        const group = await groupOf(c, source);
        await cluster.create(
          'replicatedsnapshots',
          namespace,
          snapshotBody(name, group, opts.label, opts.verify),
        );
        if (opts.output === 'json') return printJson({ name, namespace, consistencyGroup: group });
        process.stdout.write(`replicatedsnapshot ${namespace}/${name} of group ${group} created\n`);
      },
    );
  cmd
    .command('list')
    .description('ReplicatedSnapshots, oldest first')
    .argument('[source]', 'only those of this relationship or consistency group')
    .addOption(outputOption())
    .action(async (source: string | undefined, opts: { output: string }, c: Command) => {
      const { cluster, namespace } = target(c);
      const group = source ? await groupOf(c, source) : undefined;
      const all = (await cluster.list<ReplicatedSnapshot>('replicatedsnapshots', namespace))
        .map(viewOf)
        .filter((s) => !group || s.group === group)
        .sort(
          (a, b) => a.creationTime.localeCompare(b.creationTime) || a.name.localeCompare(b.name),
        );
      if (opts.output === 'json') return printJson({ snapshots: all });
      printTable(
        ['NAME', 'GROUP', 'LABEL', 'PHASE', 'READY', 'COPIES', 'VERIFIED', 'CREATED'],
        all.map((s) => [
          s.name,
          s.group || s.pvc,
          s.label || '-',
          s.phase,
          String(s.readyToUse),
          s.copies || '-',
          s.verification || '-',
          s.creationTime || '-',
        ]),
      );
    });
  return cmd;
}

function verify(): Command {
  return new Command('verify')
    .description('snapshot a relationship on every copy and compare the copies’ region hashes')
    .argument('<relationship>', 'SyncRelationship (or ConsistencyGroup)')
    .option(
      '--name <name>',
      'the ReplicatedSnapshot made for it (default: <relationship>-verify-<time>)',
    )
    .option('--timeout <duration>', 'give up waiting after this long', '30m')
    .addOption(outputOption())
    .action(
      async (
        source: string,
        opts: { name?: string; timeout: string; output: string },
        c: Command,
      ) => {
        const { cluster, namespace } = target(c);
        const group = await groupOf(c, source);
        const name =
          opts.name ??
          `${source}-verify-${new Date().toISOString().replace(/[-:]/g, '').slice(0, 15).toLowerCase()}`;
        await cluster.create(
          'replicatedsnapshots',
          namespace,
          snapshotBody(name, group, 'verify', true),
        );
        const deadline = Date.now() + parseDuration(opts.timeout, '--timeout');
        for (;;) {
          const s = await cluster.get<ReplicatedSnapshot>('replicatedsnapshots', namespace, name);
          const v = s.status?.verification;
          if (v) {
            if (opts.output === 'json') printJson({ snapshot: name, ...v });
            else
              process.stdout.write(
                `${namespace}/${name}: ${v.result}${v.message ? ` (${v.message})` : ''}\n`,
              );
            if (v.result !== 'Identical') process.exitCode = 1;
            return;
          }
          if (Date.now() >= deadline)
            throw new LockstepError(
              'LOCKSTEP_ERR_UNAVAILABLE',
              `timed out after ${opts.timeout} waiting for ${namespace}/${name} to be verified`,
            );
          await new Promise((r) => setTimeout(r, 1000));
        }
      },
    );
}

export const snapshotCommands = { snapshot, verify };
