// `npm run soak:failover -- --rounds N`: the failover soak (test/harness/failover-soak.ts) for
// long runs: N rounds of killing, pausing and cutting off copies under a writer; it exits 1 if
// an acknowledged write was lost, two copies were primary in one epoch, or an epoch went back.
import { parseArgs } from 'node:util';
import { soakFailover } from '../test/harness/failover-soak';

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { rounds: { type: 'string', default: '100' } } });
  const rounds = Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds < 1)
    throw new Error('--rounds must be a positive whole number');
  const r = await soakFailover(rounds, (line) => process.stderr.write(`${line}\n`));
  const failovers = r.rounds.filter((x) => x.kind === 'kill-primary' || x.kind === 'pause-primary');
  const times = failovers.map((x) => x.ms).sort((x, y) => x - y);
  process.stdout.write(
    `soak rounds=${r.rounds.length} failovers=${failovers.length} ` +
      `acked_writes=${r.writer.acked} acked_slots=${r.ackedSlots} verified_slots=${r.ackedVerified} ` +
      `failed_writes=${r.writer.failed} lost_acked=${r.ackedSlots - r.ackedVerified} ` +
      `dual_primaries=${r.dualPrimaries} ` +
      `record_anomalies=${r.recordAnomalies.length} final_epoch=${r.rounds.at(-1)?.epoch ?? 0} ` +
      `round_median_ms=${times[Math.floor(times.length / 2)] ?? 0}\n`,
  );
  for (const a of r.recordAnomalies) process.stdout.write(`anomaly: ${a}\n`);
  if (r.ackedVerified !== r.ackedSlots || r.dualPrimaries > 0 || r.recordAnomalies.length > 0)
    process.exitCode = 1;
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
