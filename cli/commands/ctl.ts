// `lockstep ctl`: drives an agent's control API from a shell, the way drbdadm drives DRBD.
import { Command } from 'commander';
import { AgentClient, type VolumeInfo } from '../../lib/agent-client';
import { formatSize, parseSize } from '../../lib/size';
import { outputOption, printJson, printTable, type OutputFormat } from '../output';

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

export function ctlCommand(): Command {
  const ctl = new Command('ctl')
    .description('control an agent through its gRPC API')
    .option(
      '--agent <host:port>',
      'agent control address',
      process.env.LOCKSTEP_AGENT ?? '127.0.0.1:7400',
    )
    .option('--timeout <duration>', 'deadline for each call, in seconds', '10');

  const withClient = async <T>(
    cmd: Command,
    fn: (client: AgentClient) => Promise<T>,
  ): Promise<T> => {
    const opts = cmd.optsWithGlobals<{ agent: string; timeout: string }>();
    const client = new AgentClient(opts.agent, Number(opts.timeout) * 1000);
    try {
      return await fn(client);
    } finally {
      client.close();
    }
  };

  ctl
    .command('status')
    .description('show the agent and its volumes')
    .addOption(outputOption())
    .action(async (opts: { output: OutputFormat }, cmd: Command) => {
      const status = await withClient(cmd, (c) => c.status());
      if (opts.output === 'json') return printJson(status);
      const info = status.info!;
      process.stdout.write(
        `node:      ${info.node}\nversion:   ${info.version}\nstarted:   ${new Date(info.startedAtMs).toISOString()}\n` +
          `data dir:  ${status.dataDir}\nnbd:       ${status.nbdSocket}${status.nbdTcp ? `, tcp ${status.nbdTcp}` : ''}\n\n`,
      );
      printTable(VOLUME_HEADERS, volumeRows(status.volumes));
    });

  const volume = ctl.command('volume').description('create, list and delete volumes');
  volume
    .command('create <name>')
    .description('create a volume (a sparse file of the given size)')
    .requiredOption('--size <size>', 'size, e.g. 256MiB or 10GiB (a multiple of 4KiB)')
    .option('--read-only', 'serve the volume read-only', false)
    .addOption(outputOption())
    .action(
      async (
        name: string,
        opts: { size: string; readOnly: boolean; output: OutputFormat },
        cmd: Command,
      ) => {
        const size = parseSize(opts.size, '--size');
        const created = await withClient(cmd, (c) => c.createVolume(name, size, opts.readOnly));
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
  return ctl;
}
