// The mediator's records, crash-safe: a compare-and-swap is answered only once the new record
// is on disk, so a mediator killed at any moment and restarted never grants an epoch twice.
//
//   records.snapshot   every record, rewritten atomically when the log is compacted
//   records.log        records changed since, one line each: "<crc32 hex> <json>\n"
//
// Swaps arriving in the same turn are written and synced together (one fdatasync for all). On
// start the log is replayed over the snapshot (a record replaces one with a lower epoch). A last
// line cut short or failing its checksum is a write that never completed, hence was never
// answered: it is dropped. A damaged line before the last, or a damaged snapshot, stops the
// mediator with the file and line named: guessing could grant an epoch twice.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { writeFileAtomic } from '../../lib/atomic-file';
import { LockstepError } from '../../lib/errors';

export interface MediatorRecord {
  group: string;
  epoch: number;
  primary: string;
  inSync: string[];
  grantedAtMs: number;
}

export type SwapResult =
  { granted: true; record: MediatorRecord } | { granted: false; record: MediatorRecord };

const SNAPSHOT = 'records.snapshot';
const LOG = 'records.log';
/** Past this many log lines, the records are written out whole and the log starts over. */
const COMPACT_AFTER = 10_000;

interface Pending {
  record: MediatorRecord;
  done: (err?: Error) => void;
}

export class RecordStore {
  private log!: fs.FileHandle;
  private logLines = 0;
  private pending: Pending[] = [];
  private writing: Promise<void> | undefined;
  /** Set once a write failed: what is on disk is unknown, so nothing more is answered. */
  private failure: LockstepError | undefined;

  private constructor(
    private readonly dir: string,
    private readonly records: Map<string, MediatorRecord>,
  ) {}

  static async open(dir: string): Promise<RecordStore> {
    const records = new Map<string, MediatorRecord>();
    const snapshotFile = path.join(dir, SNAPSHOT);
    const snapshot = await fs.readFile(snapshotFile, 'utf8').catch(notFound(''));
    if (snapshot) {
      for (const r of parseSnapshot(snapshot, snapshotFile)) records.set(r.group, r);
    }
    const logFile = path.join(dir, LOG);
    const text = await fs.readFile(logFile, 'utf8').catch(notFound(''));
    const { entries, validBytes } = parseLog(text, logFile);
    for (const r of entries) {
      const had = records.get(r.group);
      if (!had || r.epoch > had.epoch) records.set(r.group, r);
    }
    const store = new RecordStore(dir, records);
    if (validBytes < Buffer.byteLength(text)) {
      // The torn tail goes before anything is appended after it.
      await fs.truncate(logFile, validBytes);
    }
    store.log = await fs.open(logFile, 'a', 0o600);
    store.logLines = entries.length;
    if (store.logLines >= COMPACT_AFTER) await store.compact();
    return store;
  }

  // Declared first: class fields are defined in order, and `failed` sets this one.
  private onFailure!: (err: LockstepError) => void;
  /** Resolves with the error once records can no longer be written: restart the mediator. */
  readonly failed = new Promise<LockstepError>((resolve) => (this.onFailure = resolve));

  get(group: string): MediatorRecord {
    this.refuseIfFailed();
    return this.records.get(group) ?? { group, epoch: 0, primary: '', inSync: [], grantedAtMs: 0 };
  }

  list(): MediatorRecord[] {
    this.refuseIfFailed();
    return [...this.records.values()].sort((a, b) => a.group.localeCompare(b.group));
  }

  /**
   * Sets the group's record to epoch `expectedEpoch + 1` (or `atLeast`, if higher) if its epoch
   * is still `expectedEpoch`. Decided at once (one swap per epoch), answered once durable. The
   * primary is in sync.
   */
  async compareAndSwap(
    group: string,
    expectedEpoch: number,
    primary: string,
    inSync: string[],
    atLeast = 0,
  ): Promise<SwapResult> {
    const current = this.get(group); // throws if a write failed before
    if (current.epoch !== expectedEpoch) return { granted: false, record: current };
    const record: MediatorRecord = {
      group,
      epoch: Math.max(expectedEpoch + 1, atLeast),
      primary,
      inSync: [...new Set([primary, ...inSync])].sort(),
      grantedAtMs: Date.now(),
    };
    // In memory first: a second swap from the same epoch, even in this turn, is refused.
    this.records.set(group, record);
    await new Promise<void>((resolve, reject) => {
      this.pending.push({ record, done: (err) => (err ? reject(err) : resolve()) });
      this.writing ??= this.writeBatches().catch((err: LockstepError) => {
        this.failure = err;
        this.onFailure(err);
      });
    });
    return { granted: true, record };
  }

  async close(): Promise<void> {
    await this.writing;
    await this.log.close();
  }

  private refuseIfFailed(): void {
    if (this.failure) throw this.failure;
  }

  /** Writes what is pending, one sync per batch, until nothing is. */
  private async writeBatches(): Promise<void> {
    // Lets the swaps of this turn join the first batch.
    await new Promise((resolve) => setImmediate(resolve));
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      try {
        await this.log.write(batch.map((p) => logLine(p.record)).join(''));
        await this.log.datasync();
        this.logLines += batch.length;
        if (this.logLines >= COMPACT_AFTER) await this.compact();
        for (const p of batch) p.done();
      } catch (err) {
        // Not durable, so not granted; and this process can no longer tell what is on disk.
        const failure = new LockstepError(
          'LOCKSTEP_ERR_IO',
          `the mediator could not record epochs in ${this.dir}: ${(err as Error).message}`,
        );
        for (const p of [...batch, ...this.pending]) p.done(failure);
        this.pending = [];
        throw failure;
      }
    }
    this.writing = undefined;
  }

  /** Every record into the snapshot, then an empty log (a crash between replays the log again). */
  private async compact(): Promise<void> {
    await writeFileAtomic(path.join(this.dir, SNAPSHOT), JSON.stringify(this.list()) + '\n');
    await this.log.truncate(0);
    await this.log.datasync();
    this.logLines = 0;
  }
}

function logLine(r: MediatorRecord): string {
  const json = JSON.stringify(r);
  return `${crc32(json).toString(16).padStart(8, '0')} ${json}\n`;
}

function parseLog(text: string, file: string): { entries: MediatorRecord[]; validBytes: number } {
  const entries: MediatorRecord[] = [];
  let at = 0;
  let line = 0;
  while (at < text.length) {
    line++;
    const end = text.indexOf('\n', at);
    const content = end < 0 ? text.slice(at) : text.slice(at, end);
    const record = end < 0 ? undefined : parseLine(content);
    if (!record) {
      // Only the last line may be incomplete: a write cut short, never answered.
      if (end < 0 || end === text.length - 1) break;
      throw new LockstepError(
        'LOCKSTEP_ERR_METADATA_CORRUPT',
        `${file} line ${line} is damaged (bad checksum or format) and records follow it; ` +
          'refusing to start, since a lost record could let an epoch be granted twice',
      );
    }
    entries.push(record);
    at = end + 1;
  }
  return { entries, validBytes: Buffer.byteLength(text.slice(0, at)) };
}

function parseLine(content: string): MediatorRecord | undefined {
  const m = /^([0-9a-f]{8}) (.*)$/.exec(content);
  if (!m || crc32(m[2]) !== Number.parseInt(m[1], 16)) return undefined;
  try {
    const r = JSON.parse(m[2]) as MediatorRecord;
    return isRecord(r) ? r : undefined;
  } catch {
    return undefined;
  }
}

function parseSnapshot(text: string, file: string): MediatorRecord[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (!Array.isArray(parsed) || !parsed.every(isRecord)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_METADATA_CORRUPT',
      `${file} is damaged; refusing to start, since a lost record could let an epoch be granted twice`,
    );
  }
  return parsed;
}

function isRecord(r: unknown): r is MediatorRecord {
  const o = r as MediatorRecord;
  return (
    typeof o === 'object' &&
    o !== null &&
    typeof o.group === 'string' &&
    Number.isSafeInteger(o.epoch) &&
    o.epoch > 0 &&
    typeof o.primary === 'string' &&
    Array.isArray(o.inSync) &&
    o.inSync.every((a) => typeof a === 'string') &&
    Number.isSafeInteger(o.grantedAtMs)
  );
}

function notFound<T>(fallback: T): (err: NodeJS.ErrnoException) => T {
  return (err) => {
    if (err.code === 'ENOENT') return fallback;
    throw err;
  };
}
