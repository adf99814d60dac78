// An agent's event-loop delay, as its /metrics reports it. prom-client samples the loop with
// monitorEventLoopDelay and starts its histogram over at each scrape, so a scrape covers what
// happened since the one before. The histogram holds the whole time between two samples, so
// an idle loop reads the sampling interval there: the delay is that figure less the interval.
import { EVENT_LOOP_SAMPLE_MS } from '../lib/process-metrics';
import type { AgentProcess } from '../test/harness/agent-process';

/** The delay's p99 and largest value in ms since the last scrape (NaN where absent). */
export async function eventLoopDelayMs(
  agent: AgentProcess,
): Promise<{ p99Ms: number; maxMs: number }> {
  const text = await (await fetch(`http://127.0.0.1:${agent.metricsPort}/metrics`)).text();
  const pick = (stat: string) => {
    const re = new RegExp(
      `^lockstep_agent_nodejs_eventloop_lag_${stat}_seconds(?:\\{[^}]*\\})? (\\S+)$`,
      'm',
    );
    const m = re.exec(text);
    return m ? Math.max(0, Number(m[1]) * 1000 - EVENT_LOOP_SAMPLE_MS) : NaN;
  };
  return { p99Ms: pick('p99'), maxMs: pick('max') };
}
