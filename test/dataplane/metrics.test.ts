// The agents' metrics as Prometheus scrapes them from a busy replicated volume (a mediator, a
// snapshot, writes under way): promtool's linter passes the real output, every enum is a full
// set of 0/1 series with exactly one 1, and the figures say what happened.
import { packageVersion } from '../../lib/package-root';
import { AgentProcess, run } from '../harness/agent-process';
import { MediatorProcess } from '../harness/mediator-process';
import { waitFor } from '../harness/processes';
import { parseSamples, promtool, samplesOf, type Sample } from '../harness/promtool';
import { inSync, waitPeer } from '../harness/replication';
import { PEER_STATES, PROTECTION_STATES } from '../../sidecar/src/replication/replication-status';

const scrape = async (agent: AgentProcess) =>
  (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();

/** The series of an enum gauge for one object: every state once, and which one is 1. */
function enumOf(samples: Sample[], name: string, label: string, match: Record<string, string>) {
  const series = samplesOf(samples, name, match);
  return {
    states: series.map((s) => s.labels[label]).sort(),
    current: series.filter((s) => s.value === 1).map((s) => s.labels[label]),
    values: new Set(series.map((s) => s.value)),
  };
}

describe('agent metrics', () => {
  const mediator = new MediatorProcess();
  const a = new AgentProcess({ node: 'metrics-a', metrics: true });
  const b = new AgentProcess({ node: 'metrics-b', metrics: true });

  beforeAll(async () => {
    await mediator.start();
    await a.start();
    await b.start();
    await a.createVolume('v', '64MiB');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 8m', a.uri('v')]);
    await a.ctl('replicate', 'v', '--to', b.grpcAddress, '--mediator', mediator.address);
    await waitPeer(a, 'v', b, inSync, 'in sync');
    await a.ctl('snapshot', 'create', 'v', 'before');
    // 64 writes, so that the one-in-8 sampled write legs have observations.
    await run('qemu-io', [
      '-f',
      'raw',
      ...Array.from({ length: 64 }, (_, i) => ['-c', `write -P ${i + 1} ${i * 65536} 64k`]).flat(),
      a.uri('v'),
    ]);
  });
  afterAll(async () => {
    await a.dispose();
    await b.dispose();
    await mediator.dispose();
  });

  it('pass promtool check metrics, on the primary and the secondary', async () => {
    for (const agent of [a, b]) {
      const text = await scrape(agent);
      const checked = await promtool(['check', 'metrics'], text);
      expect({ node: agent.node, ...checked }).toEqual({
        node: agent.node,
        code: 0,
        stdout: '',
        stderr: '',
      });
    }
  });

  it('give every enum as one 0/1 series per state, exactly one at 1', async () => {
    const primary = parseSamples(await scrape(a));
    const peer = enumOf(primary, 'lockstep_replication_peer_state', 'state', { volume: 'v' });
    expect(peer.states).toEqual([...PEER_STATES].sort());
    expect(peer.current).toEqual(['InSync']);
    expect(peer.values).toEqual(new Set([0, 1]));
    const standing = enumOf(primary, 'lockstep_replication_protection_state', 'state', {
      volume: 'v',
    });
    expect(standing.states).toEqual([...PROTECTION_STATES].sort());
    expect(standing.current).toEqual(['holding']);
    expect(enumOf(primary, 'lockstep_volume_role', 'role', { volume: 'v' }).current).toEqual([
      'primary',
    ]);
    const secondary = parseSamples(await scrape(b));
    expect(enumOf(secondary, 'lockstep_volume_role', 'role', { volume: 'v' })).toMatchObject({
      states: ['primary', 'secondary'],
      current: ['secondary'],
    });
  });

  it('say what happened: bytes sent and taken, snapshots, the mediator, write legs, the build', async () => {
    const written = 64 * 65536;
    const primary = await waitFor(
      'the writes counted as sent',
      async () => {
        const s = parseSamples(await scrape(a));
        const live = samplesOf(s, 'lockstep_replication_sent_bytes_total', { kind: 'live' });
        return (live[0]?.value ?? 0) >= written ? s : undefined;
      },
      10_000,
      100,
    );
    expect(
      samplesOf(primary, 'lockstep_replication_sent_bytes_total', { kind: 'resync' })[0]?.value,
    ).toBeGreaterThan(0);
    expect(samplesOf(primary, 'lockstep_snapshots', { volume: 'v' })[0]?.value).toBe(1);
    // The first write to each block after the snapshot saved the old one (64 × 64 KiB), in a
    // log with a small record per block.
    const saved = samplesOf(primary, 'lockstep_snapshot_saved_bytes', { volume: 'v' })[0]?.value;
    expect(saved).toBeGreaterThanOrEqual(written);
    expect(saved).toBeLessThan(written * 1.01);
    expect(samplesOf(primary, 'lockstep_replication_mediator_reachable')[0]?.value).toBe(1);
    expect(samplesOf(primary, 'lockstep_replication_accepts_writes')[0]?.value).toBe(1);
    for (const leg of ['local', 'remote'])
      expect(
        samplesOf(primary, 'lockstep_write_leg_duration_seconds_count', { volume: 'v', leg })[0]
          ?.value,
      ).toBeGreaterThanOrEqual(64 / 8);
    expect(samplesOf(primary, 'lockstep_build_info')).toEqual([
      {
        name: 'lockstep_build_info',
        labels: {
          version: packageVersion,
          runtime: expect.stringMatching(/^v24\./) as string,
          node: 'metrics-a',
        },
        value: 1,
      },
    ]);
    const secondary = parseSamples(await scrape(b));
    expect(
      samplesOf(secondary, 'lockstep_replication_received_bytes_total', { volume: 'v' })[0]?.value,
    ).toBeGreaterThanOrEqual(written);
  });
});
