// `lockstep mediator`: runs the tiebreaker of a third failure domain until SIGTERM/SIGINT, or
// until its records can no longer be written (then it exits non-zero, to be restarted: it
// recovers from what is on disk and never grants an epoch twice).
import { Command } from 'commander';
import { errorMessage } from '../../lib/errors';
import { KubeClient } from '../../lib/kube-rest/client';
import { loadRestConfig } from '../../lib/kube-rest/config';
import { createLogger } from '../../lib/logger';
import { Mediator } from '../../mediator/src/mediator';
import type * as RequesterModule from '../../lib/tls/certificate-requester';
import { MEDIATOR_NAME } from '../../lib/tls/in-cluster';
import { requestCertificate } from '../requested-certificate';
import { addTransportOptions, daemonTransport } from '../transport-flags';

export function mediatorCommand(): Command {
  return addTransportOptions(new Command('mediator'))
    .requiredOption('--data-dir <dir>', 'where the records are kept (one mediator per dir)')
    .option('--listen <host:port>', 'gRPC address', '0.0.0.0:7450')
    .option(
      '--request-certificate',
      'in a cluster whose operator manages certificates: ask it for the mediator’s certificate ' +
        '(the key is made here and stays here), write it to --tls-dir (default: a private ' +
        'temporary directory) and renew it before it expires',
      false,
    )
    .option(
      '--kubeconfig <file>',
      'kubeconfig for --request-certificate (default: $KUBECONFIG, else in-cluster)',
    )
    .option('--namespace <ns>', 'the operator’s namespace (its CA bundle)', 'lockstep-system')
    .action(
      async (opts: {
        dataDir: string;
        listen: string;
        tlsDir?: string;
        insecure: boolean;
        requestCertificate: boolean;
        kubeconfig?: string;
        namespace: string;
      }) => {
        const log = createLogger('mediator');
        let mediator: Mediator;
        let requester: RequesterModule.CertificateRequester | undefined;
        try {
          let tlsDir = opts.tlsDir;
          if (opts.requestCertificate) {
            ({ tlsDir, requester } = await requestCertificate(
              new KubeClient(loadRestConfig(opts.kubeconfig)),
              opts,
              { role: 'mediator', name: MEDIATOR_NAME },
              log,
            ));
          }
          const transport = await daemonTransport({ ...opts, tlsDir }, log, { role: 'mediator' });
          mediator = await Mediator.start({
            dataDir: opts.dataDir,
            listen: opts.listen,
            transport,
            log,
          });
        } catch (err) {
          log.fatal({ err: errorMessage(err) }, 'mediator failed to start');
          // At once: nothing started before the failure is worth waiting for.
          process.exit(1);
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
        requester?.stop();
        await mediator.stop();
        process.exit();
      },
    );
}
