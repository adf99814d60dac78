// A ConsistencyGroup's volumes and where each one's data lives.
import type { V1PersistentVolume, V1PersistentVolumeClaim } from '@kubernetes/client-node';
import type { ConsistencyGroup, GroupVolume } from '../api/types';
import { locatePvc, type PvcLocation } from './pvc-location';

export interface Lookup {
  pvc(namespace: string, name: string): V1PersistentVolumeClaim | undefined;
  pvcs(namespace: string): V1PersistentVolumeClaim[];
  pv(name: string): V1PersistentVolume | undefined;
}

/** The group's volumes: listed, or one per selected PVC (named after it), in a stable order. */
export function groupVolumes(group: ConsistencyGroup, lookup: Lookup): GroupVolume[] {
  const { volumes, pvcSelector } = group.spec;
  if (volumes) return volumes;
  if (!pvcSelector) return [];
  const ns = group.metadata.namespace ?? '';
  return lookup
    .pvcs(ns)
    .filter((p) =>
      Object.entries(pvcSelector.matchLabels).every(([k, v]) => p.metadata?.labels?.[k] === v),
    )
    .map((p) => ({
      name: p.metadata?.name ?? '',
      pvc: p.metadata?.name ?? '',
      file: pvcSelector.file,
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

export function locate(namespace: string, pvcName: string, lookup: Lookup): PvcLocation {
  const pvc = lookup.pvc(namespace, pvcName);
  const pvName = pvc?.spec?.volumeName ?? '';
  return locatePvc(pvc, pvName, pvName ? lookup.pv(pvName) : undefined, pvcName);
}

/** Whether the group names (or selects) this PVC. */
export function groupUsesPvc(group: ConsistencyGroup, pvc: V1PersistentVolumeClaim): boolean {
  const { volumes, pvcSelector } = group.spec;
  const name = pvc.metadata?.name;
  if (volumes) return volumes.some((v) => v.pvc === name);
  return Object.entries(pvcSelector?.matchLabels ?? {}).every(
    ([k, v]) => pvc.metadata?.labels?.[k] === v,
  );
}
