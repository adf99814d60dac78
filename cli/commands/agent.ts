// `lockstep agent`: runs the node agent in the foreground until SIGTERM/SIGINT.
import { Command, Option } from 'commander';
import { createLogger } from '../../lib/logger';
import { errorMessage, isLockstepError } from '../../lib/errors';
import { Agent, DEFAULT_PEER_TIMEOUT_MS } from '../../sidecar/src/agent';
import { DEFAULT_CUTOVER } from '../../sidecar/src/replication/establishment';
import { byteSize, nonNegativeInteger, positiveInteger } from '../arguments';
import { addTransportOptions, daemonTransport } from '../transport-flags';
import { KubeClient } from '../../lib/kube-rest/client';
import { loadRestConfig } from '../../lib/kube-rest/config';
import type * as RequesterModule from '../../lib/tls/certificate-requester';
import { requestCertificate } from '../requested-certificate';

export function agentCommand(): Command {
  return addTransportOptions(new Command('agent'))
    .requiredOption('--node <name>', 'name of the node this agent serves')
    .requiredOption('--data-dir <dir>', 'directory holding the volumes and the agent state')
    .addOption(
      new Option('--listen <host:port>', 'gRPC control API address').default('127.0.0.1:7400'),
    )
    .option('--nbd-socket <path>', 'NBD unix socket (mode 0660)', '<data-dir>/nbd.sock')
    .option(
      '--nbd-listen <host:port>',
      'also serve NBD over TCP (opt-in; with TLS, clients must STARTTLS with a certificate from the CA)',
    )
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics')
    .option(
      '--advertise <host:port>',
      'the address peers dial to reach this agent (default: --listen)',
    )
    .option(
      '--data-listen <host:port>',
      'replication data lanes (default: --listen host, a free port)',
    )
    .option(
      '--data-advertise <host:port>',
      'the data address primaries dial (default: --advertise host and the bound port)',
    )
    .option(
      '--peer-timeout <ms>',
      'fail a peer link when a replicated write is unacknowledged this long (a silent peer stalls writes this long)',
      positiveInteger,
      DEFAULT_PEER_TIMEOUT_MS,
    )
    .option(
      '--cutover-bytes <size>',
      'establishing a replica: cut over to live mirroring after a diff of at most this size',
      byteSize,
      DEFAULT_CUTOVER.bytes,
    )
    .option(
      '--cutover-ms <ms>',
      'establishing a replica: cut over after a diff that took at most this long',
      nonNegativeInteger,
      DEFAULT_CUTOVER.ms,
    )
    .option('--register', 'register a LockstepNode and heartbeat through a Lease', false)
    .option(
      '--kubeconfig <file>',
      'kubeconfig for --register and --request-certificate (default: $KUBECONFIG, else in-cluster)',
    )
    .option('--namespace <ns>', 'namespace of the heartbeat Lease', 'lockstep-system')
    .option(
      '--request-certificate',
      'in a cluster whose operator manages certificates: ask it for this node’s certificate ' +
        '(the key is made here and stays here), write it to --tls-dir (default: a private ' +
        'temporary directory) and renew it before it expires',
      false,
    )
    .action(
      async (opts: {
        register: boolean;
        kubeconfig?: string;
        namespace: string;
        node: string;
        dataDir: string;
        listen: string;
        nbdSocket: string;
        nbdListen?: string;
        metricsListen?: string;
        advertise?: string;
        dataListen?: string;
        dataAdvertise?: string;
        peerTimeout: number;
        cutoverBytes: number;
        cutoverMs: number;
        tlsDir?: string;
        insecure: boolean;
        requestCertificate: boolean;
      }) => {
        const log = createLogger('agent', { node: opts.node });
        let agent: Agent;
        let requester: RequesterModule.CertificateRequester | undefined;
        try {
          // One client (one connection) for the certificate requests and the registration.
          const kube =
            opts.register || opts.requestCertificate
              ? new KubeClient(loadRestConfig(opts.kubeconfig))
              : undefined;
          let tlsDir = opts.tlsDir;
          if (kube && opts.requestCertificate) {
            ({ tlsDir, requester } = await requestCertificate(
              kube,
              opts,
              { role: 'agent', name: opts.node },
              log,
            ));
          }
          const transport = await daemonTransport({ ...opts, tlsDir }, log, {
            role: 'agent',
            name: opts.node,
          });
          agent = await Agent.start({
            transport,
            node: opts.node,
            dataDir: opts.dataDir,
            listen: opts.listen,
            nbdSocket: opts.nbdSocket === '<data-dir>/nbd.sock' ? undefined : opts.nbdSocket,
            nbdListen: opts.nbdListen,
            metricsListen: opts.metricsListen,
            advertise: opts.advertise,
            dataListen: opts.dataListen,
            dataAdvertise: opts.dataAdvertise,
            peerTimeoutMs: opts.peerTimeout,
            cutover: { ...DEFAULT_CUTOVER, bytes: opts.cutoverBytes, ms: opts.cutoverMs },
            register: kube && opts.register ? { kube, namespace: opts.namespace } : undefined,
            log,
          });
        } catch (err) {
          log.fatal(
            { code: isLockstepError(err) ? err.code : undefined, err: errorMessage(err) },
            'agent failed to start',
          );
          // At once: nothing started before the failure is worth waiting for.
          process.exit(1);
        }
        await new Promise<void>((resolve) => {
          const onSignal = (signal: NodeJS.Signals) => {
            log.info({ signal }, 'signal received');
            process.off('SIGTERM', onSignal).off('SIGINT', onSignal);
            requester?.stop();
            agent.stop().then(resolve, (err: unknown) => {
              log.error({ err: errorMessage(err) }, 'agent stop failed');
              process.exitCode = 1;
              resolve();
            });
          };
          process.on('SIGTERM', onSignal).on('SIGINT', onSignal);
        });
        // Everything is flushed and closed; a client's connection still open (a control-API
        // client mid-handshake, a Kubernetes watch) would otherwise keep the process alive.
        process.exit();
      },
    );
}
