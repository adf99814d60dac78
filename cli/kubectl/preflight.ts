// `kubectl lockstep preflight`: what the cluster, and each node, lacks before Lockstep can
// replicate there. Each check says what is wrong and what to do; the exit code is 1 if any
// check fails, so scripts and CI can gate on it.
import { Command } from 'commander';
import * as k8s from '@kubernetes/client-node';
import { apiErrorMessage } from '../../lib/kube';
import type { LockstepNode } from '../../operator/src/api/types';
import { outputOption, printJson, printTable } from '../output';
import { target } from './cluster';

interface Check {
  scope: string;
  check: string;
  ok: boolean;
  detail: string;
}

/** A heartbeat older than this means the agent is gone (its Lease is renewed every few seconds). */
const STALE_S = 60;

export function preflight(): Command {
  return new Command('preflight')
    .description('what the cluster and each node lack before Lockstep can replicate there')
    .option('--lockstep-namespace <ns>', 'where Lockstep is installed', 'lockstep-system')
    .addOption(outputOption())
    .action(async (opts: { lockstepNamespace: string; output: string }, cmd: Command) => {
      const { cluster } = target(cmd);
      const ns = opts.lockstepNamespace;
      const checks: Check[] = [];
      const add = (scope: string, check: string, ok: boolean, detail: string) =>
        checks.push({ scope, check, ok, detail });
      let lsNodes: LockstepNode[] = [];
      try {
        lsNodes = await cluster.list<LockstepNode>('lockstepnodes');
        add('cluster', 'CRDs installed', true, 'lockstep.dev/v1alpha1 is served');
      } catch (err) {
        add(
          'cluster',
          'CRDs installed',
          false,
          `${apiErrorMessage(err)}: install the chart (crds.install=true) or deploy/crds`,
        );
      }
      const leases = cluster.kc.makeApiClient(k8s.CoordinationV1Api);
      const now = Date.now();
      const fresh = (l: k8s.V1Lease | undefined) => {
        const t = l?.spec?.renewTime ?? l?.spec?.acquireTime;
        return t ? (now - new Date(t).getTime()) / 1000 : Infinity;
      };
      try {
        const leader = await leases.readNamespacedLease({
          name: 'lockstep-operator',
          namespace: ns,
        });
        const age = fresh(leader);
        add(
          'cluster',
          'operator leading',
          age < STALE_S,
          age < STALE_S
            ? `${leader.spec?.holderIdentity ?? '?'} leads`
            : `its leader Lease was last renewed ${Math.round(age)}s ago: is the operator running?`,
        );
      } catch (err) {
        add(
          'cluster',
          'operator leading',
          false,
          `no leader Lease in ${ns} (${apiErrorMessage(err)}): is the operator installed there?`,
        );
      }
      const nodes = (await cluster.core.listNode()).items;
      for (const node of nodes) {
        const name = node.metadata?.name ?? '';
        const unschedulable = node.spec?.unschedulable ? ' (cordoned)' : '';
        const ls = lsNodes.find((n) => n.metadata.name === name);
        if (!ls) {
          add(
            name,
            'agent registered',
            false,
            `no LockstepNode: no agent runs here${unschedulable} (agent.nodeSelector, tolerations, or the DaemonSet's pods)`,
          );
          continue;
        }
        const ready = ls.status?.conditions?.find((c) => c.type === 'Ready');
        add(
          name,
          'agent registered',
          true,
          `at ${ls.spec.endpoint}${ls.spec.version ? `, version ${ls.spec.version}` : ''}`,
        );
        add(
          name,
          'agent heartbeating',
          ready?.status === 'True',
          ready ? `${ready.reason}: ${ready.message}` : 'no Ready condition yet',
        );
        if (ls.spec.capacityBytes !== undefined)
          add(
            name,
            'data dir space',
            ls.spec.capacityBytes > 1 << 30,
            `${Math.floor(ls.spec.capacityBytes / (1 << 30))} GiB free in the agent's data dir`,
          );
      }
      const versions = new Set(lsNodes.map((n) => n.spec.version).filter(Boolean));
      add(
        'cluster',
        'one agent version',
        versions.size <= 1,
        versions.size <= 1
          ? [...versions].join('') || 'unknown'
          : `agents run ${[...versions].join(', ')}: an upgrade is under way or stuck`,
      );
      if (opts.output === 'json') printJson({ ok: checks.every((c) => c.ok), checks });
      else
        printTable(
          ['SCOPE', 'CHECK', 'OK', 'DETAIL'],
          checks.map((c) => [c.scope, c.check, c.ok ? 'yes' : 'NO', c.detail]),
        );
      if (!checks.every((c) => c.ok)) process.exitCode = 1;
    });
}
