// Credentials for peers in another cluster. An agent there trusts its own cluster's CA, not
// ours; so a primary reaches it with a certificate that CA issued for this side (the operator
// hands it over from a SyncRelationship target's tlsSecretRef) and trusts that CA for that
// address alone. Each address's credentials are a TLS directory under the data dir, kept across
// restarts; a link holds the entry's transport, whose TlsDir is swapped when new credentials are
// set, so its next connection uses them.
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { writeFileAtomic } from '../../../lib/atomic-file';
import { describeIdentity } from '../../../lib/tls/identity';
import { TlsDir, writeTlsDir, type TlsMaterial } from '../../../lib/tls/tls-dir';
import type { Transport } from '../../../lib/tls/transport';

type SecureTransport = Extract<Transport, { secure: true }>;

const ADDRESS_FILE = 'address';

export class PeerCredentials {
  private readonly byAddress = new Map<string, SecureTransport>();

  private constructor(
    private readonly root: string,
    private readonly log: Logger,
  ) {}

  /** The credentials kept in the data dir; an entry that no longer checks out is logged and skipped. */
  static async load(dataDir: string, log: Logger): Promise<PeerCredentials> {
    const creds = new PeerCredentials(path.join(dataDir, 'peer-credentials'), log);
    const entries = await fs.readdir(creds.root).catch(() => [] as string[]);
    for (const entry of entries.filter((e) => !e.startsWith('.'))) {
      const dir = path.join(creds.root, entry);
      try {
        const address = (await fs.readFile(path.join(dir, ADDRESS_FILE), 'utf8')).trim();
        creds.byAddress.set(address, { secure: true, dir: await TlsDir.open(dir, { log }) });
      } catch (err) {
        log.error({ dir, err: errorMessage(err) }, 'peer credentials not usable; ignored');
      }
    }
    return creds;
  }

  /** How to reach `address`: its own credentials if it has some, else `own`. */
  transportFor(address: string, own: Transport): Transport {
    return this.byAddress.get(address) ?? own;
  }

  /**
   * Sets the credentials for `address`, checked first (a certificate, its key, and the CA that
   * issued it, not expired, with a Lockstep role): bad ones are refused and the old stay.
   */
  async set(
    address: string,
    material: TlsMaterial,
  ): Promise<{ identity: string; notAfter: Date; changed: boolean }> {
    const held = this.byAddress.get(address);
    const same =
      held &&
      held.dir.current.ca === material.ca &&
      held.dir.current.cert === material.cert &&
      held.dir.current.key === material.key;
    if (held && same)
      return {
        identity: describeIdentity(held.dir.identity),
        notAfter: held.dir.notAfter,
        changed: false,
      };
    await fs.mkdir(this.root, { recursive: true, mode: 0o700 });
    // Checked in a scratch directory, so that bad credentials never replace good ones.
    const scratch = path.join(this.root, `.check-${randomBytes(4).toString('hex')}`);
    try {
      await writeTlsDir(scratch, material.ca, { certPem: material.cert, keyPem: material.key });
      (await TlsDir.open(scratch)).close();
    } finally {
      await fs.rm(scratch, { recursive: true, force: true });
    }
    const dir = path.join(
      this.root,
      createHash('sha256').update(address).digest('hex').slice(0, 16),
    );
    await writeTlsDir(dir, material.ca, { certPem: material.cert, keyPem: material.key });
    await writeFileAtomic(path.join(dir, ADDRESS_FILE), `${address}\n`, 0o600);
    const opened = await TlsDir.open(dir, { log: this.log });
    if (held) {
      const old = held.dir;
      held.dir = opened;
      old.close();
    } else {
      this.byAddress.set(address, { secure: true, dir: opened });
    }
    this.log.info(
      { peer: address, identity: describeIdentity(opened.identity), notAfter: opened.notAfter },
      'peer credentials set',
    );
    return {
      identity: describeIdentity(opened.identity),
      notAfter: opened.notAfter,
      changed: true,
    };
  }

  close(): void {
    for (const t of this.byAddress.values()) t.dir.close();
  }
}
