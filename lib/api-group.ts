// The API group and version of Lockstep's custom resources. Its own module so that the agent,
// which writes its LockstepNode without @kubernetes/client-node, need not load lib/kube for two
// strings.
export const GROUP = 'lockstep.dev';
export const VERSION = 'v1alpha1';
