// The `lockstep` command: one binary, one subcommand per component.
import { Command } from 'commander';
import { isLockstepError, errorMessage } from '../lib/errors';
import { packageVersion } from '../lib/package-root';
import { agentCommand } from './commands/agent';
import { certsCommand } from './commands/certs';
import { ctlCommand } from './commands/ctl';
import { demoCommand } from './commands/demo';
import { mediatorCommand } from './commands/mediator';
import { operatorCommand } from './commands/operator';

export function buildProgram(): Command {
  return new Command('lockstep')
    .description('Synchronous block replication for Kubernetes (RPO = 0).')
    .version(packageVersion, '-v, --version', 'print the version and exit')
    .showHelpAfterError()
    .addCommand(agentCommand())
    .addCommand(ctlCommand())
    .addCommand(operatorCommand())
    .addCommand(mediatorCommand())
    .addCommand(demoCommand())
    .addCommand(certsCommand());
}

export function main(argv: string[]): void {
  // `lockstep ctl ... | head`: a reader that stops early is not an error worth a stack trace.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(process.exitCode ?? 0);
  });
  buildProgram()
    .parseAsync(argv)
    .catch((err: unknown) => {
      const code = isLockstepError(err) ? ` [${err.code}]` : '';
      process.stderr.write(`lockstep: ${errorMessage(err)}${code}\n`);
      process.exitCode = 1;
    });
}
