// The `lockstep` command: one binary, one subcommand per component. Only the subcommand being
// run is loaded (each pulls in its component: gRPC, the Kubernetes client, the engine); the
// others are listed by name and description, so `lockstep --version` and `--help` start fast.
import { Command } from 'commander';
import { isLockstepError, errorMessage } from '../lib/errors';
import { packageVersion } from '../lib/package-root';
/* eslint-disable @typescript-eslint/no-require-imports */
import type * as Agent from './commands/agent';
import type * as Certs from './commands/certs';
import type * as Ctl from './commands/ctl';
import type * as Demo from './commands/demo';
import type * as Mediator from './commands/mediator';
import type * as Operator from './commands/operator';

interface Subcommand {
  name: string;
  description: string;
  load(): Command;
}

const SUBCOMMANDS: Subcommand[] = [
  {
    name: 'agent',
    description: 'run the node agent: owns volumes, serves them over NBD, replicates writes',
    load: () => (require('./commands/agent') as typeof Agent).agentCommand(),
  },
  {
    name: 'ctl',
    description: 'control an agent through its gRPC API',
    load: () => (require('./commands/ctl') as typeof Ctl).ctlCommand(),
  },
  {
    name: 'operator',
    description: 'run the operator: turns SyncRelationships into replication on the agents',
    load: () => (require('./commands/operator') as typeof Operator).operatorCommand(),
  },
  {
    name: 'mediator',
    description:
      'run a mediator: per consistency group an epoch, its primary and in-sync copies, ' +
      'changed only by compare-and-swap (the fencing tokens of failover)',
    load: () => (require('./commands/mediator') as typeof Mediator).mediatorCommand(),
  },
  {
    name: 'demo',
    description:
      'replicate a volume between two local agents with a mediator, kill the primary, watch ' +
      'the replica take over, check every acknowledged write',
    load: () => (require('./commands/demo') as typeof Demo).demoCommand(),
  },
  {
    name: 'certs',
    description: 'make the CA and the certificates of a deployment outside Kubernetes (mutual TLS)',
    load: () => (require('./commands/certs') as typeof Certs).certsCommand(),
  },
];
/* eslint-enable @typescript-eslint/no-require-imports */

/**
 * The program for `argv`: the subcommand it names (also after `help`) is loaded in full, the
 * others only described; `all` loads every one (for tools that walk the whole tree).
 */
export function buildProgram(argv: string[] = [], all = false): Command {
  const args = argv.slice(2);
  const named = args[0] === 'help' ? args[1] : args[0];
  const program = new Command('lockstep')
    .description('Synchronous block replication for Kubernetes (RPO = 0).')
    .version(packageVersion, '-v, --version', 'print the version and exit')
    .showHelpAfterError();
  for (const s of SUBCOMMANDS) {
    const cmd = all || s.name === named ? s.load() : new Command(s.name);
    program.addCommand(cmd.description(s.description));
  }
  return program;
}

export function main(argv: string[]): void {
  // `lockstep ctl ... | head`: a reader that stops early is not an error worth a stack trace.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(process.exitCode ?? 0);
  });
  buildProgram(argv)
    .parseAsync(argv)
    .catch((err: unknown) => {
      const code = isLockstepError(err) ? ` [${err.code}]` : '';
      process.stderr.write(`lockstep: ${errorMessage(err)}${code}\n`);
      process.exitCode = 1;
    });
}
