// Jest global setup of the k8s suite: one control plane for every test file of the suite.
// Test files reach it through LOCKSTEP_TEST_KUBECONFIG (workers inherit the environment).
import { startControlPlane, type ControlPlane } from './control-plane';

declare global {
  var lockstepControlPlane: ControlPlane | undefined;
}

export default async function setup(): Promise<void> {
  const cp = await startControlPlane({ controllers: ['persistentvolume-binder'] });
  globalThis.lockstepControlPlane = cp;
  process.env.LOCKSTEP_TEST_KUBECONFIG = cp.kubeconfig;
  process.env.LOCKSTEP_TEST_CP_DIR = cp.dir;
}
