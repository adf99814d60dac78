// `lockstep ctl`: drives an agent's control API from a shell, the way drbdadm drives DRBD.
import { Command, Option } from 'commander';
import { AgentClient, type SnapshotInfo, type VolumeInfo } from '../../lib/agent-client';
import { formatSize, parseSize } from '../../lib/size';
import { parseDuration } from '../../lib/duration';
import { moveCommand } from './ctl-move';
import { waitInSync } from './ctl-wait';
import { epochCommand, failoverCommand } from './ctl-failover';
import { outputOption, printJson, printTable, type OutputFormat } from '../output';
import { addTransportOptions, withClientTransport } from '../transport-flags';

function volumeRows(volumes: VolumeInfo[]): string[][] {
  return volumes.map((v) => [
    v.name,
    v.state,
    v.state === 'Ready' ? formatSize(v.sizeBytes) : '-',
    formatSize(v.allocatedBytes),
    v.readOnly ? 'ro' : 'rw',
    String(v.clients),
    v.state === 'Ready' ? v.exportUri : v.error,
  ]);
}

const VOLUME_HEADERS = ['NAME', 'STATE', 'SIZE', 'ALLOCATED', 'MODE', 'CLIENTS', 'EXPORT / ERROR'];

function snapshotRows(snapshots: SnapshotInfo[]): string[][] {
  return snapshots.map((s) => [
    s.volume,
    s.name,
    s.label || '-',
    new Date(s.createdAtMs).toISOString(),
    formatSize(s.savedBytes),
    s.exportUri,
  ]);
}

const SNAPSHOT_HEADERS = ['VOLUME', 'NAME', 'LABEL', 'CREATED', 'SAVED', 'EXPORT'];

/** `--wait` alone waits up to a day; `--wait 10m` that long. */
function waitLimit(wait: string | true): number {
  return wait === true ? 24 * 3_600_000 : parseDuration(wait, '--wait');
}

export function ctlCommand(): Command {
  const ctl = addTransportOptions(new Command('ctl'))
    .option(
      '--agent <host:port>',
      'agent control address',
      process.env.LOCKSTEP_AGENT ?? '127.0.0.1:7400',
    )
    .option('--timeout <duration>', 'deadline for each call, in seconds', '10');

  const withClient = <T>(cmd: Command, fn: (client: AgentClient) => Promise<T>): Promise<T> =>
    withClientTransport(cmd, async (transport) => {
      const opts = cmd.optsWithGlobals<{ agent: string; timeout: string }>();
      const client = new AgentClient(opts.agent, transport, Number(opts.timeout) * 1000);
      try {
        return await fn(client);
      } finally {
        client.close();
      }
    });

  ctl
    .command('status [volume]')
    .description('show the agent and its volumes, or one volume with its replication peers')
    .addOption(outputOption())
    .action(async (name: string | undefined, opts: { output: OutputFormat }, cmd: Command) => {
      if (name) {
        const v = await withClient(cmd, (c) => c.getVolume(name));
        if (opts.output === 'json') return printJson(v);
        return printVolume(v);
      }
      const status = await withClient(cmd, (c) => c.status());
      if (opts.output === 'json') return printJson(status);
      const info = status.info!;
      process.stdout.write(
        `node:      ${info.node}\nversion:   ${info.version}\nstarted:   ${new Date(info.startedAtMs).toISOString()}${info.serving ? '' : ' (still starting: volumes not yet exported)'}\n` +
          `data dir:  ${status.dataDir}\nnbd:       ${status.nbdSocket}${status.nbdTcp ? `, tcp ${status.nbdTcp}` : ''}\n` +
          `data:      ${status.dataAddress}\ntransport: ${info.transport}\n\n`,
      );
      printTable(VOLUME_HEADERS, volumeRows(status.volumes));
    });

  const volume = ctl.command('volume').description('create, list and delete volumes');
  volume
    .command('create <name>')
    .description(
      'create a volume: a sparse file of the given size, or an existing file served in place',
    )
    .option('--size <size>', 'size, e.g. 256MiB or 10GiB (a multiple of 4KiB)')
    .option('--read-only', 'serve the volume read-only', false)
    .option(
      '--data-path <file>',
      'serve this file (absolute path on the agent’s node), created if absent',
    )
    .option('--secondary-of <uuid>', 'create a secondary copy of the volume with this UUID')
    .option(
      '--members <nodes>',
      'with --secondary-of: the relationship’s nodes (comma-separated, as their agents’ ' +
        'certificates name them); the copy takes a primary only from among them',
      (v: string) => v.split(',').filter((n) => n !== ''),
    )
    .addOption(outputOption())
    .action(
      async (
        name: string,
        opts: {
          size?: string;
          readOnly: boolean;
          dataPath?: string;
          secondaryOf?: string;
          members?: string[];
          output: OutputFormat;
        },
        cmd: Command,
      ) => {
        if (opts.size === undefined && opts.dataPath === undefined) {
          cmd.error('error: --size is required unless --data-path names an existing file');
        }
        if (opts.members && !opts.secondaryOf) {
          cmd.error('error: --members lists a secondary’s nodes: it needs --secondary-of');
        }
        const size = opts.size === undefined ? 0 : parseSize(opts.size, '--size');
        const created = await withClient(cmd, (c) =>
          c.createVolume(name, size, {
            readOnly: opts.readOnly,
            dataPath: opts.dataPath,
            secondaryOfUuid: opts.secondaryOf,
            members: opts.members,
          }),
        );
        if (opts.output === 'json') return printJson(created);
        process.stdout.write(
          `volume ${created.name} created (${formatSize(created.sizeBytes)}): ${created.exportUri}\n`,
        );
      },
    );
  volume
    .command('list')
    .description('list volumes')
    .addOption(outputOption())
    .action(async (opts: { output: OutputFormat }, cmd: Command) => {
      const volumes = await withClient(cmd, (c) => c.listVolumes());
      if (opts.output === 'json') return printJson({ volumes });
      printTable(VOLUME_HEADERS, volumeRows(volumes));
    });
  volume
    .command('delete <name>')
    .description('delete a volume and its files (refused while NBD clients are attached)')
    .option('--force', 'disconnect attached NBD clients first', false)
    .action(async (name: string, opts: { force: boolean }, cmd: Command) => {
      await withClient(cmd, (c) => c.deleteVolume(name, opts.force));
      process.stdout.write(`volume ${name} deleted\n`);
    });
  volume
    .command('release <name>')
    .description('stop serving a volume whose data file lives outside the data dir; keep the file')
    .option('--force', 'disconnect attached NBD clients first', false)
    .action(async (name: string, opts: { force: boolean }, cmd: Command) => {
      await withClient(cmd, (c) => c.releaseVolume(name, opts.force));
      process.stdout.write(`volume ${name} released; its data file is kept\n`);
    });
  ctl
    .command('replicate <volume>')
    .description(
      'make this copy the primary and replicate it to other agents (creating their copies)',
    )
    .requiredOption(
      '--to <host:port>',
      'a target agent (repeat for several)',
      (v: string, acc: string[]) => [...acc, v],
      [],
    )
    .addOption(
      new Option('--mode <mode>', 'acknowledge when')
        .choices(['sync', 'strict-sync', 'async'])
        .default('sync'),
    )
    .option('--region-size <size>', 'dirty-tracking granularity', '64KiB')
    .option('--max-resync-rate <size>', 'resync bandwidth per second (0: unlimited)', '0')
    .option('--replace', 'replicate to exactly these targets, dropping peers not listed', false)
    .option(
      '--mediator <host:port>',
      'a mediator (`lockstep mediator`) in a third failure domain: split brain protection and failover',
    )
    .option('--group <name>', "the mediator's record for this volume (default: its UUID)")
    .addOption(
      new Option('--failover <policy>', 'with a mediator: a replica takes over by itself, or waits')
        .choices(['automatic', 'manual'])
        .default('automatic'),
    )
    .option(
      '--grace <duration>',
      'how long a replica waits without a primary before it takes over',
      '5s',
    )
    .option(
      '--suspend-limit <duration>',
      'how long a primary that lost a peer holds writes for the mediator before failing them',
      '30s',
    )
    .option(
      '--wait [duration]',
      'then wait until every peer is in sync, showing the progress (default: up to 24h)',
    )
    .addOption(outputOption())
    .action(
      async (
        name: string,
        opts: {
          to: string[];
          mode: string;
          regionSize: string;
          maxResyncRate: string;
          replace: boolean;
          mediator?: string;
          group?: string;
          failover: string;
          grace: string;
          suspendLimit: string;
          wait?: string | true;
          output: OutputFormat;
        },
        cmd: Command,
      ) => {
        const mediator = opts.mediator && {
          address: opts.mediator,
          group: opts.group ?? '',
          failover: opts.failover,
          graceMs: parseDuration(opts.grace, '--grace'),
          suspendLimitMs: parseDuration(opts.suspendLimit, '--suspend-limit'),
        };
        const v = await withClient(cmd, async (c) => {
          const configured = await c.replicate({
            name,
            targets: opts.to,
            mode: opts.mode,
            regionSize: parseSize(opts.regionSize, '--region-size'),
            maxResyncBytesPerSecond: parseSize(opts.maxResyncRate, '--max-resync-rate'),
            replaceTargets: opts.replace,
            ...(mediator ? { mediator } : {}),
          });
          return opts.wait ? waitInSync(c, name, waitLimit(opts.wait)) : configured;
        });
        if (opts.output === 'json') return printJson(v);
        printVolume(v);
      },
    );
  ctl
    .command('unreplicate <volume>')
    .description('stop replicating (run on the primary); the copies are kept')
    .action(async (name: string, _opts: object, cmd: Command) => {
      printVolume(await withClient(cmd, (c) => c.stopReplication(name)));
    });
  ctl
    .command('promote <volume>')
    .description(
      'make this copy the primary (refused while a primary is connected, unless --force)',
    )
    .option('--force', 'promote even though a primary may still exist (after it failed)', false)
    .addOption(outputOption())
    .action(async (name: string, opts: { force: boolean; output: OutputFormat }, cmd: Command) => {
      const promoted = await withClient(cmd, (c) => c.promote(name, opts.force));
      if (opts.output === 'json') return printJson(promoted);
      const { volume, rolledBack } = promoted;
      if (rolledBack)
        process.stdout.write(
          `rolled back: a resync was catching this copy up; it is back at snapshot ${rolledBack.snapshot} ` +
            `(${new Date(Number(rolledBack.snapshotCreatedAtMs)).toISOString()}), ` +
            `${formatSize(Number(rolledBack.bytes))} restored\n`,
        );
      printVolume(volume);
    });
  ctl
    .command('demote <volume>')
    .description('drain and flush writes, then make this copy a secondary')
    .action(async (name: string, _opts: object, cmd: Command) => {
      printVolume(await withClient(cmd, (c) => c.demote(name)));
    });
  ctl.addCommand(moveCommand());
  ctl.addCommand(failoverCommand());
  ctl.addCommand(epochCommand());
  ctl
    .command('resolve <volume>')
    .description('resolve a split brain on the primary: overwrite a peer whose copy diverged')
    .requiredOption('--discard-peer <host:port>', 'the peer whose diverging writes are thrown away')
    .option('--wait [duration]', 'then wait until it has resynced, showing the progress')
    .action(
      async (name: string, opts: { discardPeer: string; wait?: string | true }, cmd: Command) => {
        printVolume(
          await withClient(cmd, async (c) => {
            const resolved = await c.discardPeer(name, opts.discardPeer);
            return opts.wait ? waitInSync(c, name, waitLimit(opts.wait)) : resolved;
          }),
        );
      },
    );
  const snapshot = ctl
    .command('snapshot')
    .description('point-in-time snapshots of a volume, exported read-only as VOLUME@SNAPSHOT');
  snapshot
    .command('create <volume> <name>')
    .description('take a snapshot (no data copied; holds the writes acknowledged before it)')
    .option('--label <label>', 'a label, e.g. daily, kept with the snapshot', '')
    .option('--retain <n>', 'keep only the newest N snapshots with this label', '0')
    .addOption(outputOption())
    .action(
      async (
        volumeName: string,
        name: string,
        opts: { label: string; retain: string; output: OutputFormat },
        cmd: Command,
      ) => {
        const created = await withClient(cmd, (c) =>
          c.createSnapshot(volumeName, name, opts.label, Number(opts.retain)),
        );
        if (opts.output === 'json') return printJson(created);
        process.stdout.write(
          `snapshot ${created.volume}@${created.name} created (writes held ${created.holdMs.toFixed(2)} ms): ${created.exportUri}\n`,
        );
        if (created.copies.length > 1) printCopies([created]);
      },
    );
  snapshot
    .command('list [volume]')
    .description("list a volume's snapshots, or every volume's, oldest first")
    .addOption(outputOption())
    .action(
      async (volumeName: string | undefined, opts: { output: OutputFormat }, cmd: Command) => {
        const snapshots = await withClient(cmd, (c) => c.listSnapshots(volumeName));
        if (opts.output === 'json') return printJson({ snapshots });
        printTable(SNAPSHOT_HEADERS, snapshotRows(snapshots));
      },
    );
  snapshot
    .command('delete <volume> <name>')
    .description('delete a snapshot (its space is reclaimed in the background)')
    .option('--force', 'disconnect NBD clients reading the snapshot first', false)
    .addOption(outputOption())
    .action(
      async (
        volumeName: string,
        name: string,
        opts: { force: boolean; output: OutputFormat },
        cmd: Command,
      ) => {
        await withClient(cmd, (c) => c.deleteSnapshot(volumeName, name, opts.force));
        if (opts.output === 'json') return printJson({ volume: volumeName, name, deleted: true });
        process.stdout.write(`snapshot ${volumeName}@${name} deleted\n`);
      },
    );
  snapshot
    .command('rollback <volume> <name>')
    .description(
      'make the volume read as the snapshot again (detach its NBD clients first; run on the primary)',
    )
    .addOption(outputOption())
    .action(
      async (volumeName: string, name: string, opts: { output: OutputFormat }, cmd: Command) => {
        const v = await withClient(cmd, (c) => c.rollbackSnapshot(volumeName, name));
        if (opts.output === 'json') return printJson(v);
        process.stdout.write(`volume ${volumeName} rolled back to snapshot ${name}\n`);
      },
    );
  const group = ctl
    .command('group')
    .description('consistency groups: volumes snapshotted at one write-order point');
  group
    .command('create <group> <volumes...>')
    .description('name a set of volumes on this agent')
    .addOption(outputOption())
    .action(
      async (name: string, volumes: string[], opts: { output: OutputFormat }, cmd: Command) => {
        const created = await withClient(cmd, (c) => c.createGroup(name, volumes));
        if (opts.output === 'json') return printJson(created);
        process.stdout.write(`group ${created.name}: ${created.volumes.join(', ')}\n`);
      },
    );
  group
    .command('list')
    .description('list consistency groups')
    .addOption(outputOption())
    .action(async (opts: { output: OutputFormat }, cmd: Command) => {
      const groups = await withClient(cmd, (c) => c.listGroups());
      if (opts.output === 'json') return printJson({ groups });
      printTable(
        ['GROUP', 'VOLUMES'],
        groups.map((g) => [g.name, g.volumes.join(',')]),
      );
    });
  group
    .command('delete <group>')
    .description('forget a consistency group (its volumes and snapshots stay)')
    .action(async (name: string, _opts: object, cmd: Command) => {
      await withClient(cmd, (c) => c.deleteGroup(name));
      process.stdout.write(`group ${name} deleted\n`);
    });
  group
    .command('snapshot <group> <name>')
    .description('snapshot every member at one write-order point (on every in-sync copy too)')
    .option('--label <label>', 'a label, e.g. daily, kept with the snapshots', '')
    .option(
      '--no-hold',
      'do not pause writes: hold back only their acknowledgements until every member has cut',
    )
    .option('--hold-timeout <ms>', 'give up if writes do not drain in time (hold)', '1000')
    .option('--retain <n>', 'keep only the newest N snapshots with this label', '0')
    .addOption(outputOption())
    .action(
      async (
        name: string,
        snapshotName: string,
        opts: {
          label: string;
          hold: boolean;
          holdTimeout: string;
          retain: string;
          output: OutputFormat;
        },
        cmd: Command,
      ) => {
        const taken = await withClient(cmd, (c) =>
          c.snapshotGroup(name, snapshotName, {
            label: opts.label,
            noHold: !opts.hold,
            holdTimeoutMs: Number(opts.holdTimeout),
            retain: Number(opts.retain),
          }),
        );
        if (opts.output === 'json') return printJson(taken);
        process.stdout.write(
          `group snapshot ${taken.group}@${taken.name} (${opts.hold ? 'writes held' : 'acks held'} ${taken.holdMs.toFixed(2)} ms)\n`,
        );
        printCopies(taken.snapshots);
      },
    );
  ctl
    .command('clone <volume> <snapshot> <new-volume>')
    .description(
      'a new writable volume from a snapshot, usable at once (hydrated in the background)',
    )
    .addOption(outputOption())
    .action(
      async (
        volumeName: string,
        snapshotName: string,
        newVolume: string,
        opts: { output: OutputFormat },
        cmd: Command,
      ) => {
        const v = await withClient(cmd, (c) =>
          c.cloneSnapshot(volumeName, snapshotName, newVolume),
        );
        if (opts.output === 'json') return printJson(v);
        process.stdout.write(
          `volume ${v.name} cloned from ${volumeName}@${snapshotName}: ${v.exportUri}\n`,
        );
      },
    );
  ctl
    .command('verify <volume> <snapshot>')
    .description("compare a snapshot's per-region hashes across every copy")
    .addOption(outputOption())
    .action(
      async (volumeName: string, name: string, opts: { output: OutputFormat }, cmd: Command) => {
        const v = await withClient(cmd, (c) => c.verifySnapshot(volumeName, name));
        if (opts.output === 'json') printJson(v);
        else {
          process.stdout.write(
            `snapshot ${v.volume}@${v.name}: ${v.identical ? 'identical on every copy' : 'COPIES DIFFER'}\n`,
          );
          printTable(
            ['COPY', 'NODE', 'STATE', 'DIFFERING REGIONS'],
            v.copies.map((c) => [
              c.address,
              c.node || '-',
              c.state,
              c.state === 'Differs'
                ? c.differingOffsets.map((o) => `${o}+${v.regionSize}`).join(' ')
                : c.reason || '-',
            ]),
          );
        }
        if (!v.identical) process.exitCode = 2;
      },
    );
  return ctl;
}

function printCopies(snapshots: SnapshotInfo[]): void {
  printTable(
    ['VOLUME', 'SNAPSHOT', 'COPY', 'NODE', 'STATE', 'REASON'],
    snapshots.flatMap((s) =>
      s.copies.map((c) => [s.volume, s.name, c.address, c.node || '-', c.state, c.reason || '-']),
    ),
  );
}

function printVolume(v: VolumeInfo): void {
  process.stdout.write(
    `volume:   ${v.name} (${v.state}, ${formatSize(v.sizeBytes)}, ${v.role}${v.readOnly ? ', read-only' : ''})\n` +
      `export:   ${v.exportUri}\n` +
      (v.cloneOf ? `clone of: ${v.cloneOf} (${v.hydratedPercent}% hydrated)\n` : ''),
  );
  const r = v.replication;
  if (!r) return;
  process.stdout.write(
    `mode:     ${r.mode}, ${formatSize(r.regionSize)} regions, generation ${r.generation}\n`,
  );
  const pr = r.protection;
  if (pr) {
    process.stdout.write(
      (pr.mediator
        ? `mediator: ${pr.mediator} (group ${pr.group}, failover ${pr.failover})\n`
        : 'mediator: none: split brain protection is off\n') +
        `epoch:    ${pr.epoch}, ${pr.acceptsWrites ? 'accepts writes' : 'does not accept writes'} (${pr.state})` +
        (pr.inSync.length > 0 ? `, in sync: ${pr.inSync.join(', ')}` : '') +
        '\n' +
        (pr.detail ? `          ${pr.detail}\n` : ''),
    );
  }
  if (v.role === 'secondary') {
    process.stdout.write(`primary:  ${r.primaryConnected ? 'connected' : 'not connected'}\n`);
    if (r.resyncSnapshot)
      process.stdout.write(
        `resync:   being caught up; its last complete state is snapshot ${r.resyncSnapshot} ` +
          '(promoting it now rolls back to that)\n',
      );
    return;
  }
  printTable(
    ['PEER', 'NODE', 'STATE', 'DIRTY', 'RESYNCED', 'PROGRESS', 'CONSISTENT AT', 'REASON'],
    r.peers.map((p) => [
      p.address,
      p.node || '-',
      p.state,
      formatSize(p.dirtyBytes),
      formatSize(p.resyncBytesSent),
      p.resync
        ? `${p.resync.kind} ${Math.floor((100 * p.resync.doneBytes) / Math.max(1, p.resync.totalBytes))}%` +
          (p.resync.etaSeconds >= 0 ? ` eta ${p.resync.etaSeconds}s` : '')
        : '-',
      // Not in sync: the peer's last consistent state, which promoting it would roll back to.
      p.consistentSnapshot
        ? `${new Date(Number(p.consistentSnapshotAtMs)).toISOString()} (${p.consistentSnapshot})`
        : '-',
      p.reason,
    ]),
  );
}
