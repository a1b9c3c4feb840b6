// Command vmfleet-coredns is the cluster DNS of the local node's pod network
// (vmfleet/dev/cluster.py): CoreDNS built from its Go module at the version go.mod
// pins, with only the plugins a cluster DNS needs, so that the build stays small.
//
//	vmfleet-coredns -conf Corefile
//
// The Corefile may use: errors, log, health, ready, loadbalance, cache, kubernetes.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugin chain's order, as in CoreDNS's plugin.cfg, restricted to the plugins
// linked above (a package's init runs before main's: this replaces the full list).
func init() {
	dnsserver.Directives = []string{
		"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes",
	}
}

func main() {
	coremain.Run()
}
