import './k8s-global-setup';

export default async function teardown(): Promise<void> {
  await globalThis.lockstepControlPlane?.stop();
}
