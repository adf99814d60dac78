// `lockstep operator`: runs the controllers until SIGTERM/SIGINT, or until it loses leadership
// (then it exits non-zero so its Deployment restarts it as a standby, as controller-runtime does).
import { Command } from 'commander';
import { createLogger } from '../../lib/logger';
import { errorMessage } from '../../lib/errors';
import type { Operator } from '../../operator/src/operator';
import type * as OperatorModule from '../../operator/src/operator';
import type * as KubeModule from '../../lib/kube';
import type * as AuthorityModule from '../../operator/src/certificates/cluster-authority';
import { CA_SECRET } from '../../lib/tls/in-cluster';
import { duration, positiveInteger } from '../arguments';
import { addTransportOptions, daemonTransport, issuedTlsDir } from '../transport-flags';

export function operatorCommand(): Command {
  return addTransportOptions(new Command('operator'))
    .option('--kubeconfig <file>', 'kubeconfig (default: in-cluster or $KUBECONFIG)')
    .option(
      '--namespace <ns>',
      'namespace of the leader and agent heartbeat Leases',
      'lockstep-system',
    )
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics')
    .option('--leader-elect', 'run as one of several replicas, leading through a Lease', false)
    .option(
      '--agent-poll <ms>',
      'how often each agent’s replication state is read',
      positiveInteger,
      1000,
    )
    .option(
      '--monitor-shards <n>',
      'with --leader-elect: the relationships are monitored for a lost primary in this many ' +
        'shards, spread over the replicas through Leases',
      positiveInteger,
      4,
    )
    .option(
      '--manage-certificates',
      'run the cluster’s Lockstep CA: make the CA Secret if there is none, sign the agents’ ' +
        'certificate requests (each for its own node only) and issue this operator’s own ' +
        'certificate into --tls-dir (default: a private temporary directory)',
      false,
    )
    .option(
      '--ca-secret <name>',
      'with --manage-certificates: the CA’s kubernetes.io/tls Secret in --namespace',
      CA_SECRET,
    )
    .option(
      '--no-create-ca',
      'with --manage-certificates: never make the CA Secret (cert-manager or you provide it); ' +
        'wait for it',
    )
    .option(
      '--certificate-lifetime <duration>',
      'with --manage-certificates: how long issued certificates are valid (renewed when two ' +
        'thirds are gone)',
      duration,
      24 * 3_600_000,
    )
    .action(
      async (opts: {
        monitorShards: number;
        kubeconfig?: string;
        namespace: string;
        metricsListen?: string;
        leaderElect: boolean;
        agentPoll: number;
        tlsDir?: string;
        insecure: boolean;
        manageCertificates: boolean;
        caSecret: string;
        createCa: boolean;
        certificateLifetime: number;
      }) => {
        const log = createLogger('operator');
        let operator: Operator;
        try {
          // Loaded here, not at the top: the Kubernetes client costs every other subcommand
          // (ctl, agent) ~0.15 s of start-up.
          /* eslint-disable @typescript-eslint/no-require-imports */
          const { loadKubeConfig } = require('../../lib/kube') as typeof KubeModule;
          const { Operator } = require('../../operator/src/operator') as typeof OperatorModule;
          /* eslint-enable @typescript-eslint/no-require-imports */
          const kc = loadKubeConfig(opts.kubeconfig);
          let authority: AuthorityModule.ClusterAuthority | undefined;
          let tlsDir = opts.tlsDir;
          if (opts.manageCertificates) {
            const { ClusterAuthority } =
              require('../../operator/src/certificates/cluster-authority') as typeof AuthorityModule; // eslint-disable-line @typescript-eslint/no-require-imports
            tlsDir = issuedTlsDir(opts, '--manage-certificates', 'operator');
            authority = await ClusterAuthority.open({
              kc,
              namespace: opts.namespace,
              lifetimeMs: opts.certificateLifetime,
              secret: opts.caSecret,
              create: opts.createCa,
              log: log.child({ subsystem: 'certificates' }),
            });
            await authority.issueOwn(tlsDir, { role: 'operator', name: 'lockstep-operator' });
          }
          const transport = await daemonTransport({ ...opts, tlsDir }, log, { role: 'operator' });
          operator = new Operator({
            transport,
            authority,
            kc,
            namespace: opts.namespace,
            metricsListen: opts.metricsListen,
            leaderElect: opts.leaderElect,
            agentPollMs: opts.agentPoll,
            monitorShards: opts.monitorShards,
            log,
          });
        } catch (err) {
          log.fatal({ err: errorMessage(err) }, 'operator failed to start');
          // Kubernetes clients keep connections alive: without an exit the process would linger.
          process.exit(1);
        }
        const stopped = new Promise<'signal'>((resolve) => {
          const onSignal = (signal: NodeJS.Signals) => {
            log.info({ signal }, 'signal received');
            process.off('SIGTERM', onSignal).off('SIGINT', onSignal);
            resolve('signal');
          };
          process.on('SIGTERM', onSignal).on('SIGINT', onSignal);
        });
        const started = operator.start().then(
          () => operator.lost.then(() => 'lost' as const),
          (err: unknown) => {
            log.fatal({ err: errorMessage(err) }, 'operator failed');
            return 'failed' as const;
          },
        );
        const why = await Promise.race([stopped, started]);
        if (why !== 'signal') process.exitCode = 1;
        if (why === 'lost') log.error('leadership lost: exiting so a standby takes over');
        await operator.stop().catch((err: unknown) => {
          log.error({ err: errorMessage(err) }, 'operator stop failed');
          process.exitCode = 1;
        });
        process.exit();
      },
    );
}
