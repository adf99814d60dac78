// Structured JSON logs (pino) on stdout. Components take child loggers once, at setup, so the
// request path never builds bindings; disabled levels cost a property check.
import pino from 'pino';

export type Logger = pino.Logger;

export function createLogger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return pino({
    level: process.env.LOCKSTEP_LOG_LEVEL ?? 'info',
    base: { component, ...bindings },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
  });
}
