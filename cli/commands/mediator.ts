// `lockstep mediator`: runs the tiebreaker of a third failure domain until SIGTERM/SIGINT, or
// until its records can no longer be written (then it exits non-zero, to be restarted: it
// recovers from what is on disk and never grants an epoch twice).
import { Command } from 'commander';
import { errorMessage } from '../../lib/errors';
import { createLogger } from '../../lib/logger';
import { Mediator } from '../../mediator/src/mediator';
import { addTransportOptions, daemonTransport } from '../transport-flags';

export function mediatorCommand(): Command {
  return addTransportOptions(new Command('mediator'))
    .description(
      'run a mediator: per consistency group an epoch, its primary and in-sync copies, ' +
        'changed only by compare-and-swap (the fencing tokens of failover)',
    )
    .requiredOption('--data-dir <dir>', 'where the records are kept (one mediator per dir)')
    .option('--listen <host:port>', 'gRPC address', '0.0.0.0:7450')
    .action(
      async (opts: { dataDir: string; listen: string; tlsDir?: string; insecure: boolean }) => {
        const log = createLogger('mediator');
        let mediator: Mediator;
        try {
          const transport = await daemonTransport(opts, log, { role: 'mediator' });
          mediator = await Mediator.start({
            dataDir: opts.dataDir,
            listen: opts.listen,
            transport,
            log,
          });
        } catch (err) {
          log.fatal({ err: errorMessage(err) }, 'mediator failed to start');
          process.exitCode = 1;
          return;
        }
        const why = await new Promise<'signal' | 'failed'>((resolve) => {
          const onSignal = (signal: NodeJS.Signals) => {
            log.info({ signal }, 'signal received');
            resolve('signal');
          };
          process.once('SIGTERM', onSignal).once('SIGINT', onSignal);
          void mediator.failed.then((err) => {
            log.fatal({ err: errorMessage(err) }, 'records can no longer be written; exiting');
            resolve('failed');
          });
        });
        if (why === 'failed') process.exit(1);
        await mediator.stop();
        process.exit();
      },
    );
}
