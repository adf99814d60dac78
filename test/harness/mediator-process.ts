// A `lockstep mediator` as a separate process, on a free loopback port with its own data dir,
// on the Node runtime we ship; restartable on the same port and dir, as after a crash.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MediatorClient } from '../../lib/mediator-client';
import type { Transport } from '../../lib/tls/transport';
import { lockstepBin } from './agent-process';
import { freePort, startProcess, waitFor, type ManagedProcess } from './processes';
import { productNode } from './product-runtime';
import { adminTransport, tlsDirFor } from './test-certificates';

let instances = 0;

export class MediatorProcess {
  private readonly id = ++instances;
  proc!: ManagedProcess;
  address = '';
  private starts = 0;
  private readonly ownsDir: boolean;

  /** Without a data dir it makes its own (and removes it when disposed). */
  constructor(
    readonly dataDir = '',
    /** The address it listens on. */
    private readonly host = '127.0.0.1',
    /**
     * Mutual TLS with certificates from elsewhere (a cluster's operator): its transport flags,
     * and the administrator's transport the test's clients use.
     */
    private readonly tls?: { args: string[]; admin: () => Transport },
  ) {
    this.ownsDir = !dataDir;
    this.dataDir ||= mkdtempSync(path.join(os.tmpdir(), 'lockstep-mediator-'));
  }

  /** Starts it and waits until it answers. */
  async start(): Promise<this> {
    this.address ||= `${this.host}:${await freePort()}`;
    this.proc = await this.spawn();
    await waitFor(
      'the mediator to answer',
      async () => {
        if (this.proc.child.exitCode !== null)
          throw new Error(`mediator exited:\n${this.proc.log()}`);
        const client = this.client(1000);
        try {
          return (await client.records().then(() => true)) || undefined;
        } catch {
          return undefined;
        } finally {
          client.close();
        }
      },
      20_000,
      50,
    );
    return this;
  }

  /** Starts it expecting it to refuse: resolves with its exit code and output. */
  async startRefused(): Promise<{ code: number | string; log: string }> {
    this.address ||= `127.0.0.1:${await freePort()}`;
    this.proc = await this.spawn();
    const code = await this.proc.exited;
    return { code, log: this.proc.log() };
  }

  private async spawn(): Promise<ManagedProcess> {
    const transportArgs = this.tls?.args ?? [
      '--tls-dir',
      await tlsDirFor({ role: 'mediator', name: 'mediator' }),
    ];
    return startProcess(
      'mediator',
      productNode(),
      [
        lockstepBin,
        'mediator',
        '--data-dir',
        this.dataDir,
        '--listen',
        this.address,
        ...transportArgs,
      ],
      path.join(this.dataDir, `mediator.${this.id}.${++this.starts}.log`),
    );
  }

  /** A client, as an administrator. */
  client(timeoutMs?: number): MediatorClient {
    return new MediatorClient(this.address, this.tls?.admin() ?? adminTransport(), timeoutMs);
  }

  async dispose(): Promise<void> {
    await this.proc?.kill('SIGKILL');
    if (this.ownsDir) rmSync(this.dataDir, { recursive: true, force: true });
  }
}
