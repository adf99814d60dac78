// The alerts the chart installs: promtool checks the rule file and runs its unit tests (series
// that fire each alert, and series that must not: test/alerts/alerts.test.yaml), and every
// metric an alert reads is one the agent or the operator exports.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import yaml from 'js-yaml';
import { packageRoot } from '../../lib/package-root';
import { metricNamesIn, registeredMetricNames } from '../harness/metric-names';
import { promtool } from '../harness/promtool';

const rules = path.join(packageRoot, 'charts', 'lockstep', 'files', 'alerts.yaml');

interface RuleFile {
  groups: {
    name: string;
    rules: { alert: string; expr: string; labels?: { severity?: string } }[];
  }[];
}

describe('alerts', () => {
  it('pass promtool check rules', async () => {
    const checked = await promtool(['check', 'rules', rules]);
    expect(checked).toMatchObject({ code: 0, stderr: '' });
    expect(checked.stdout).toMatch(/SUCCESS: \d+ rules found/);
  });

  it('fire on the series they are for, and only then (promtool test rules)', async () => {
    const tested = await promtool([
      'test',
      'rules',
      path.join(packageRoot, 'test', 'alerts', 'alerts.test.yaml'),
    ]);
    expect(tested.stdout + tested.stderr).toMatch(/SUCCESS/);
    expect(tested.code).toBe(0);
  });

  it('read only metrics the agent and the operator export, and each has a severity', () => {
    const registered = registeredMetricNames();
    const file = yaml.load(readFileSync(rules, 'utf8')) as RuleFile;
    const alerts = file.groups.flatMap((g) => g.rules);
    expect(alerts.length).toBeGreaterThanOrEqual(9);
    for (const a of alerts) {
      const unknown = metricNamesIn(a.expr).filter((n) => !registered.has(n));
      expect({ alert: a.alert, unknown }).toEqual({ alert: a.alert, unknown: [] });
      expect(['warning', 'critical']).toContain(a.labels?.severity);
    }
  });

  it('the name check itself catches a misspelt metric and bad syntax', () => {
    const registered = registeredMetricNames();
    expect(registered.has('lockstep_replication_peer_state')).toBe(true);
    expect(registered.has('lockstep_write_leg_duration_seconds_bucket')).toBe(true);
    expect(metricNamesIn('rate(lockstep_replication_sent_byte_total[5m])')).toEqual([
      'lockstep_replication_sent_byte_total',
    ]);
    expect(() => metricNamesIn('sum by (node (up)')).toThrow(/syntax error/);
  });
});
