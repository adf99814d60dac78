// `kubectl lockstep support-bundle`: one archive with what a bug report needs. The Lockstep
// objects of every namespace (spec and status), the LockstepNodes, the Events about them, the
// Leases, and the operator's and agents' pods with their recent logs. Secrets are never read.
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Command } from 'commander';
import * as k8s from '@kubernetes/client-node';
import yaml from 'js-yaml';
import { apiErrorMessage } from '../../lib/kube';
import { packageVersion } from '../../lib/package-root';
import { outputOption, printJson } from '../output';
import { target, type Plural } from './cluster';

const execFileAsync = promisify(execFile);
const KINDS: Plural[] = [
  'syncrelationships',
  'consistencygroups',
  'replicatedsnapshots',
  'lockstepnodes',
];
const LOG_LINES = 2000;

export function supportBundle(): Command {
  return new Command('support-bundle')
    .description('collect the Lockstep objects, Events, Leases and component logs into a .tar.gz')
    .option('--lockstep-namespace <ns>', 'where Lockstep is installed', 'lockstep-system')
    .option(
      '--out <file>',
      'the archive',
      `lockstep-support-${new Date().toISOString().replace(/[:.]/g, '-')}.tar.gz`,
    )
    .addOption(outputOption())
    .action(
      async (opts: { lockstepNamespace: string; out: string; output: string }, cmd: Command) => {
        const { cluster } = target(cmd);
        const dir = path.join(
          mkdtempSync(path.join(os.tmpdir(), 'lockstep-bundle-')),
          'lockstep-support',
        );
        mkdirSync(dir);
        const files: string[] = [];
        const problems: string[] = [];
        const save = (name: string, content: unknown) => {
          const file = path.join(dir, name);
          mkdirSync(path.dirname(file), { recursive: true });
          writeFileSync(
            file,
            typeof content === 'string' ? content : yaml.dump(content, { noRefs: true }),
          );
          files.push(name);
        };
        const attempt = async (what: string, work: () => Promise<void>) => {
          try {
            await work();
          } catch (err) {
            problems.push(`${what}: ${apiErrorMessage(err)}`);
          }
        };
        const namespaces = new Set<string>([opts.lockstepNamespace]);
        for (const kind of KINDS)
          await attempt(kind, async () => {
            const items = await cluster.list<k8s.KubernetesObject>(kind);
            for (const o of items) if (o.metadata?.namespace) namespaces.add(o.metadata.namespace);
            save(`${kind}.yaml`, items);
          });
        for (const ns of namespaces)
          await attempt(`events in ${ns}`, async () => {
            const events = (await cluster.core.listNamespacedEvent({ namespace: ns })).items.filter(
              (e) =>
                e.involvedObject.apiVersion?.startsWith('lockstep.dev/') ||
                ns === opts.lockstepNamespace,
            );
            save(`events/${ns}.yaml`, events);
          });
        const ns = opts.lockstepNamespace;
        await attempt('leases', async () => {
          const leases = cluster.kc.makeApiClient(k8s.CoordinationV1Api);
          save('leases.yaml', (await leases.listNamespacedLease({ namespace: ns })).items);
        });
        await attempt('pods', async () => {
          const pods = (
            await cluster.core.listNamespacedPod({
              namespace: ns,
              labelSelector: 'app.kubernetes.io/name=lockstep',
            })
          ).items;
          save('pods.yaml', pods);
          for (const pod of pods) {
            const name = pod.metadata?.name ?? '';
            for (const c of pod.spec?.containers ?? [])
              await attempt(`logs of ${name}`, async () => {
                const log = await cluster.core.readNamespacedPodLog({
                  name,
                  namespace: ns,
                  container: c.name,
                  tailLines: LOG_LINES,
                });
                save(`logs/${name}.${c.name}.log`, String(log));
              });
          }
        });
        save(
          'README.txt',
          [
            `Lockstep support bundle, made by kubectl lockstep ${packageVersion} at ${new Date().toISOString()}.`,
            `Files: ${files.length}. Secrets are not included.`,
            ...(problems.length ? ['', 'Not collected:', ...problems.map((p) => `- ${p}`)] : []),
            '',
          ].join('\n'),
        );
        await execFileAsync('tar', [
          '-czf',
          path.resolve(opts.out),
          '-C',
          path.dirname(dir),
          'lockstep-support',
        ]);
        rmSync(path.dirname(dir), { recursive: true, force: true });
        if (opts.output === 'json')
          return printJson({ archive: path.resolve(opts.out), files, problems });
        process.stdout.write(
          `wrote ${opts.out} (${files.length} files${problems.length ? `; not collected: ${problems.length}, see README.txt` : ''})\n`,
        );
      },
    );
}
