// Where a PVC's data lives: PVC → bound PV → node and directory. Lockstep's agents serve files
// from the node's filesystem, so only PV kinds with a node-local path qualify (`local`, and
// `hostPath` pinned to a node); anything else gets a clear reason instead of a guess.
import type { V1PersistentVolume, V1PersistentVolumeClaim } from '@kubernetes/client-node';

export type PvcLocation =
  | { ok: true; node: string | undefined; path: string; capacityBytes: number }
  | { ok: false; reason: string; message: string };

const HOSTNAME_KEYS = ['kubernetes.io/hostname'];

/** The node a PV is pinned to by its required node affinity, if exactly one. */
function pinnedNode(pv: V1PersistentVolume): string | undefined {
  const terms = pv.spec?.nodeAffinity?.required?.nodeSelectorTerms ?? [];
  const nodes = new Set<string>();
  for (const t of terms) {
    for (const e of t.matchExpressions ?? []) {
      if (HOSTNAME_KEYS.includes(e.key) && e.operator === 'In') {
        for (const v of e.values ?? []) nodes.add(v);
      }
    }
  }
  return nodes.size === 1 ? [...nodes][0] : undefined;
}

export function locatePvc(
  pvc: V1PersistentVolumeClaim | undefined,
  pvName: string,
  pv: V1PersistentVolume | undefined,
  pvcName: string,
): PvcLocation {
  if (!pvc) {
    return { ok: false, reason: 'PVCNotFound', message: `PVC ${pvcName} does not exist` };
  }
  if (pvc.status?.phase !== 'Bound' || !pvName) {
    return {
      ok: false,
      reason: 'PVCNotBound',
      message: `PVC ${pvcName} is ${pvc.status?.phase ?? 'Pending'}, not Bound`,
    };
  }
  if (!pv) {
    return {
      ok: false,
      reason: 'PVNotFound',
      message: `PV ${pvName} of PVC ${pvcName} does not exist`,
    };
  }
  const path = pv.spec?.local?.path ?? pv.spec?.hostPath?.path;
  if (!path) {
    return {
      ok: false,
      reason: 'UnsupportedVolumeKind',
      message: `PV ${pvName} of PVC ${pvcName} is not a local or hostPath volume; Lockstep serves files from node-local paths only`,
    };
  }
  const capacity = pv.spec?.capacity?.storage ?? pvc.status?.capacity?.storage ?? '0';
  return { ok: true, node: pinnedNode(pv), path, capacityBytes: parseQuantity(capacity) };
}

const SUFFIX: Record<string, number> = {
  '': 1,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  P: 1e15,
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
};

/** A Kubernetes quantity in bytes (the forms storage sizes take); 0 when unreadable. */
export function parseQuantity(q: string): number {
  const m = /^([0-9.]+)([a-zA-Z]*)$/.exec(q.trim());
  const mult = m ? SUFFIX[m[2] ?? ''] : undefined;
  return m && mult !== undefined ? Math.floor(Number(m[1]) * mult) : 0;
}
