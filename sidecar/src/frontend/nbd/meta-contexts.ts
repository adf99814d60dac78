// Metadata-context negotiation (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT): the
// request's layout, and which of the device's contexts its queries name.
//
// Query syntax, which the spec leaves to the server to define and document:
// - A query ending in ':' ("base:", "lockstep:", "lockstep:changed:") is a wildcard: listing
//   returns every listed context whose name starts with it; selecting ignores it, as the spec
//   asks for an empty leaf name.
// - Any other query names one context, which is selected or listed if the device has it, even
//   a member of a family the device does not enumerate (a snapshot's "lockstep:changed:<name>").
// - A query needs a namespace: a non-empty prefix up to the first ':', without spaces. Queries
//   for unknown namespaces or leaves match nothing; they are not errors.
import type { MetaContexts } from '../../block-device';
import { MAX_NAME_BYTES } from './protocol';

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/** Contexts one SET_META_CONTEXT may select: each costs a device query per BLOCK_STATUS. */
export const MAX_SELECTED_CONTEXTS = 16;

/**
 * The option's data: export name, query count, then each query, all lengths 32-bit. Returns
 * what is wrong with it instead if it does not add up.
 */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest | string {
  let at = 0;
  /** The length-prefixed string at `at`, or undefined if it does not fit the data. */
  const next = (): string | undefined => {
    if (data.length - at < 4) return undefined;
    const length = data.readUInt32BE(at);
    if (length > MAX_NAME_BYTES || data.length - at - 4 < length) return undefined;
    at += 4 + length;
    return data.toString('utf8', at - length, at);
  };
  const exportName = next();
  if (exportName === undefined || data.length - at < 4) return 'bad export name length';
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    const query = next();
    if (query === undefined) return `query ${i + 1} of ${count} does not fit the option data`;
    queries.push(query);
  }
  if (at !== data.length) return 'data left after the last query';
  return { exportName, queries };
}

/**
 * The contexts `queries` name, each once, in the order first named; `selecting` for SET (which
 * ignores wildcards), else LIST (where no queries at all means every context). Returns what is
 * wrong instead if a query has no namespace.
 */
export function matchMetaContexts(
  contexts: MetaContexts | undefined,
  queries: readonly string[],
  selecting: boolean,
): string[] | string {
  const bad = queries.find((q) => !/^[^:\s]+:/u.test(q));
  if (bad !== undefined) return `query ${JSON.stringify(bad)} does not start with a namespace`;
  if (!contexts) return [];
  if (queries.length === 0) return selecting ? [] : contexts.list();
  const found = new Set<string>();
  for (const q of queries) {
    if (!q.endsWith(':')) {
      if (contexts.has(q)) found.add(q);
    } else if (!selecting) {
      for (const name of contexts.list()) if (name.startsWith(q)) found.add(name);
    }
  }
  return [...found];
}
