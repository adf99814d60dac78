// `lockstep certs`: the CA and certificates of a deployment outside Kubernetes (in a cluster
// the operator makes them). `init` makes a CA; `issue` writes a TLS directory (ca.crt, tls.crt,
// tls.key) for one agent, mediator, operator or administrator, to pass as --tls-dir.
import { Command, Option } from 'commander';
import { LockstepError } from '../../lib/errors';
import {
  createAuthority,
  issueCertificate,
  readAuthorityDir,
  writeAuthorityDir,
  writeGnutlsClientFiles,
} from '../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../lib/tls/tls-dir';
import { describeIdentity, validateIdentityName, type Identity } from '../../lib/tls/identity';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { positiveInteger } from '../arguments';

interface IssueOptions {
  ca: string;
  out: string;
  node?: string;
  peerCluster?: string;
  admin?: string | true;
  operator?: string | true;
  mediator?: string | true;
  client?: string;
  days: number;
  dns: string[];
  ip: string[];
}

const collect = (v: string, all: string[]) => [...all, v];

export function certsCommand(): Command {
  const certs = new Command('certs');
  certs
    .command('init')
    .argument('<ca-dir>', 'where the CA goes: ca.crt (give it to every component) and ca.key')
    .description('make a new CA')
    .option('--name <cn>', 'the CA’s common name', 'Lockstep CA')
    .action(async (dir: string, opts: { name: string }) => {
      if (existsSync(path.join(dir, 'ca.key')))
        throw new LockstepError(
          'LOCKSTEP_ERR_NOT_ALLOWED',
          `${dir} already holds a CA (ca.key); every certificate it issued depends on it: remove it by hand to start over`,
        );
      await writeAuthorityDir(dir, await createAuthority(opts.name));
      process.stdout.write(`CA written to ${dir} (ca.crt, ca.key: keep ca.key private)\n`);
    });
  certs
    .command('issue')
    .description('issue a certificate, written as a TLS directory for --tls-dir')
    .requiredOption(
      '--ca <ca-dir>',
      'the CA (from `lockstep certs init`, or the files of a kubernetes.io/tls CA Secret)',
    )
    .requiredOption('--out <dir>', 'the TLS directory to write: ca.crt, tls.crt, tls.key')
    .option('--node <name>', 'for the agent of this node (its --node)')
    .option(
      '--peer-cluster <name>',
      'for the agents of another cluster that replicate to this one (a SyncRelationship ' +
        'target’s tlsSecretRef there); pick a name none of this cluster’s nodes has',
    )
    .option('--admin [name]', 'for an administrator running `lockstep ctl`')
    .option('--operator [name]', 'for the operator')
    .option('--mediator [name]', 'for a mediator')
    .option(
      '--client <name>',
      'for a workload’s NBD client on the TCP export (also as ca-cert.pem, client-cert.pem, client-key.pem for qemu and libnbd)',
    )
    .option('--days <n>', 'valid for this many days', positiveInteger, 90)
    .addOption(
      new Option('--dns <name>', 'a DNS name for clients that check one (repeatable)')
        .argParser(collect)
        .default([]),
    )
    .addOption(
      new Option('--ip <address>', 'an IP address for clients that check one (repeatable)')
        .argParser(collect)
        .default([]),
    )
    .action(async (opts: IssueOptions, cmd: Command) => {
      const id = identityOf(opts, cmd);
      const ca = await readAuthorityDir(opts.ca);
      const issued = await issueCertificate(ca, id, {
        validMs: opts.days * 86_400_000,
        dnsNames: opts.dns,
        ips: opts.ip,
      });
      await writeTlsDir(opts.out, ca.certPem, issued);
      if (id.role === 'client') await writeGnutlsClientFiles(opts.out, ca.certPem, issued);
      process.stdout.write(
        `certificate for ${describeIdentity(id)} written to ${opts.out}, valid until ${issued.notAfter.toISOString()}\n`,
      );
    });
  return certs;
}

function identityOf(opts: IssueOptions, cmd: Command): Identity {
  const given: Identity[] = [];
  if (opts.node !== undefined) given.push({ role: 'agent', name: opts.node });
  // To this cluster's agents a peer cluster is one more agent, named for that cluster.
  if (opts.peerCluster !== undefined) given.push({ role: 'agent', name: opts.peerCluster });
  const named = (v: string | true | undefined, role: Identity['role'], dflt: string) => {
    if (v !== undefined) given.push({ role, name: v === true ? dflt : v });
  };
  named(opts.admin, 'admin', 'admin');
  named(opts.operator, 'operator', 'lockstep-operator');
  named(opts.mediator, 'mediator', 'mediator');
  named(opts.client, 'client', 'client');
  if (given.length !== 1)
    cmd.error(
      'error: give exactly one of --node, --peer-cluster, --admin, --operator, --mediator, --client',
    );
  validateIdentityName(given[0].name);
  return given[0];
}
