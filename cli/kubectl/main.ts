// `kubectl lockstep`: the kubectl plugin (bin/kubectl-lockstep). It works through the
// Kubernetes API only, with the user's kubeconfig and RBAC: it reads what the operator reports
// in status and writes intent into spec, as kubectl would. Every command takes -o json for
// scripts.
import { Command, Option } from 'commander';
import { apiErrorMessage } from '../../lib/kube';
import { outputOption, printJson, printTable } from '../output';
import { target } from './cluster';
import { preflight } from './preflight';
import { primaryCommands } from './primary';
import { snapshotCommands } from './snapshots';
import { supportBundle } from './support-bundle';
import { waitCommand } from './wait';
import { STATUS_HEADERS, formatCopy, statusRow, viewOf } from './relationship-view';
import type { ConsistencyGroup, SyncRelationship } from '../../operator/src/api/types';

function statusCommand(): Command {
  return new Command('status')
    .description('relationships: phase, primary, each copy’s state with progress and ETA, lag')
    .argument('[relationship]', 'one SyncRelationship (default: all in the namespace)')
    .addOption(outputOption())
    .action(async (name: string | undefined, opts: { output: string }, cmd: Command) => {
      const { cluster, namespace, all } = target(cmd);
      const rels = name
        ? [await cluster.get<SyncRelationship>('syncrelationships', namespace, name)]
        : await cluster.list<SyncRelationship>('syncrelationships', all ? undefined : namespace);
      const views = rels.map(viewOf);
      if (opts.output === 'json') return printJson({ relationships: views });
      if (!views.length) {
        process.stdout.write(`No SyncRelationships in ${all ? 'any namespace' : namespace}.\n`);
        return;
      }
      printTable(
        all ? ['NAMESPACE', ...STATUS_HEADERS] : STATUS_HEADERS,
        views.map((v) => statusRow(v, all)),
      );
    });
}

function pvcCommand(): Command {
  return new Command('pvc')
    .description('which relationship protects a PVC, and where its copies are')
    .argument('<name>', 'PersistentVolumeClaim')
    .addOption(outputOption())
    .action(async (name: string, opts: { output: string }, cmd: Command) => {
      const { cluster, namespace } = target(cmd);
      const pvc = await cluster.core.readNamespacedPersistentVolumeClaim({ name, namespace });
      const labels = pvc.metadata?.labels ?? {};
      const groups = (await cluster.list<ConsistencyGroup>('consistencygroups', namespace)).flatMap(
        (g) => {
          const listed = g.spec.volumes?.find((v) => v.pvc === name)?.name;
          const selected =
            g.spec.pvcSelector &&
            Object.entries(g.spec.pvcSelector.matchLabels).every(([k, v]) => labels[k] === v);
          return listed || selected ? [{ group: g.metadata.name, volume: listed ?? name }] : [];
        },
      );
      const rels = await cluster.list<SyncRelationship>('syncrelationships', namespace);
      const found = groups.map((g) => ({
        ...g,
        relationships: rels.filter((r) => r.spec.consistencyGroup === g.group).map(viewOf),
      }));
      if (opts.output === 'json')
        return printJson({
          pvc: name,
          namespace,
          volumeName: pvc.spec?.volumeName ?? '',
          groups: found,
        });
      if (!found.length) {
        process.stdout.write(
          `PVC ${namespace}/${name} is not in any ConsistencyGroup: it is not replicated.\n`,
        );
        return;
      }
      const lines: string[] = [];
      for (const g of found) {
        lines.push(`PVC ${namespace}/${name} is volume ${g.volume} of ConsistencyGroup ${g.group}`);
        if (!g.relationships.length) lines.push('  no SyncRelationship replicates this group');
        for (const r of g.relationships) {
          const uri = r.exports.find((e) => e.volume === g.volume)?.uri;
          lines.push(
            `  protected by SyncRelationship ${r.name} (${r.mode}, ${r.phase})`,
            `    primary: ${r.primary || '-'}${uri ? `   export: ${uri}` : ''}`,
            `    copies:  ${r.copies.map(formatCopy).join(', ') || '-'}`,
          );
        }
      }
      process.stdout.write(lines.join('\n') + '\n');
    });
}

export function pluginProgram(): Command {
  const program = new Command('kubectl lockstep')
    .description('Lockstep, from kubectl: relationships, copies, failover, snapshots, checks.')
    .option('--kubeconfig <file>', 'kubeconfig (default: $KUBECONFIG or ~/.kube/config)')
    .option('-n, --namespace <ns>', 'namespace (default: the context’s)')
    .addOption(new Option('-A, --all-namespaces', 'every namespace').default(false))
    .showHelpAfterError()
    .addCommand(statusCommand())
    .addCommand(pvcCommand())
    .addCommand(waitCommand());
  for (const c of primaryCommands()) program.addCommand(c);
  program.addCommand(snapshotCommands.snapshot()).addCommand(snapshotCommands.verify());
  program.addCommand(preflight()).addCommand(supportBundle());
  return program;
}

export function main(argv: string[]): void {
  pluginProgram()
    .parseAsync(argv)
    .catch((err: unknown) => {
      process.stderr.write(`kubectl lockstep: ${apiErrorMessage(err)}\n`);
      process.exitCode = 1;
    });
}
