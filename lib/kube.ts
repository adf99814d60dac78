// @kubernetes/client-node plumbing for the operator and the kubectl plugin. The agent and the
// mediator use lib/kube-rest instead: this client costs them ~50 MiB of memory.
import { createHash } from 'node:crypto';
import type http from 'node:http';
import type https from 'node:https';
import * as k8s from '@kubernetes/client-node';

export { GROUP, VERSION } from './api-group';

/** A kubeconfig file, or the default chain ($KUBECONFIG, ~/.kube/config, in-cluster). */
export function loadKubeConfig(file?: string): k8s.KubeConfig {
  const kc = new k8s.KubeConfig();
  if (file) kc.loadFromFile(file);
  else kc.loadFromDefault();
  reuseConnections(kc);
  return kc;
}

type AgentFactory = (cluster: unknown, options: https.AgentOptions) => http.Agent;

/**
 * client-node 1.4 builds a new https.Agent for every request, so each API call paid a fresh
 * TLS handshake (measured: a third of the operator's CPU while 500 relationships were set up,
 * and as much again on the apiserver). This keeps one keep-alive agent per distinct TLS
 * identity. It replaces a private method; if that ever disappears, requests still work, they
 * just do not share connections.
 */
function reuseConnections(kc: k8s.KubeConfig): void {
  const target = kc as unknown as { createAgent?: AgentFactory };
  const original = target.createAgent?.bind(kc);
  if (!original) return;
  const agents = new Map<string, http.Agent>();
  target.createAgent = (cluster, options) => {
    const key = createHash('sha256')
      .update(
        JSON.stringify([
          options.ca,
          options.cert,
          options.key,
          options.rejectUnauthorized,
          options.servername,
        ]),
      )
      .digest('hex');
    let agent = agents.get(key);
    if (!agent) {
      agent = original(cluster, { ...options, keepAlive: true });
      agents.set(key, agent);
    }
    return agent;
  };
}

export const mergePatch = k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.MergePatch);

function statusCode(err: unknown): number | undefined {
  return err instanceof k8s.ApiException ? (err as k8s.ApiException<unknown>).code : undefined;
}

export const isNotFound = (err: unknown): boolean => statusCode(err) === 404;
export const isConflict = (err: unknown): boolean => statusCode(err) === 409;
export const isAlreadyExists = isConflict;

/** The apiserver's message for a failed request (its Status body), not the client's wrapper. */
export function apiErrorMessage(err: unknown): string {
  if (err instanceof k8s.ApiException) {
    const body = (err as k8s.ApiException<unknown>).body;
    try {
      const parsed = (typeof body === 'string' ? JSON.parse(body) : body) as { message?: string };
      if (parsed.message) return `${err.code}: ${parsed.message}`;
    } catch {
      // not a Status body: fall through
    }
    return `HTTP ${err.code}`;
  }
  return err instanceof Error ? err.message : String(err);
}
