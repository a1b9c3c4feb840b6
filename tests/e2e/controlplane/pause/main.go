// Command pause is the sandbox ("pause") container of the local node's pods: it holds
// the pod's namespaces and waits until it is told to stop. The local node builds its
// pause image from this binary (vmfleet/dev/node.py); no image is pulled.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of the pod's PID namespace (shareProcessNamespace), reap the orphans.
	signal.Ignore(syscall.SIGCHLD)
	<-stop
}
