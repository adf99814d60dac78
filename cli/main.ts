// The `lockstep` command: one binary, one subcommand per component.
import { Command } from 'commander';
import { packageVersion } from '../lib/package-root';

export function buildProgram(): Command {
  return new Command('lockstep')
    .description('Synchronous block replication for Kubernetes (RPO = 0).')
    .version(packageVersion, '-v, --version', 'print the version and exit')
    .showHelpAfterError();
}

export function main(argv: string[]): void {
  buildProgram()
    .parseAsync(argv)
    .catch((err: unknown) => {
      process.stderr.write(`lockstep: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    });
}
