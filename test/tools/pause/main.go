// The pod sandbox's process, for the test kubelet's containerd: registry.k8s.io/pause cannot be
// pulled here (no registry), so the test builds its own. It holds the pod's namespaces open and
// exits on SIGINT or SIGTERM, as the real one does.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
