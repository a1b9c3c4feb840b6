// Command vmfleet-controlplane is the local Kubernetes control plane used by vmfleet's
// end-to-end tests and `vmfleet dev up`. One binary holds several programs, chosen by the
// first argument (one component per process):
//
//	vmfleet-controlplane etcd [flags]                     embedded etcd (go.etcd.io/etcd/server/v3/embed)
//	vmfleet-controlplane kube-apiserver [flags]           k8s.io/kubernetes/cmd/kube-apiserver
//	vmfleet-controlplane kube-controller-manager [flags]  k8s.io/kubernetes/cmd/kube-controller-manager
//	vmfleet-controlplane kube-scheduler [flags]           k8s.io/kubernetes/cmd/kube-scheduler
//	vmfleet-controlplane kubelet [flags]                  k8s.io/kubernetes/cmd/kubelet (the local node)
//	vmfleet-controlplane kube-proxy [flags]               k8s.io/kubernetes/cmd/kube-proxy (Services of the local node's pod network)
//	vmfleet-controlplane kubectl [args]                   k8s.io/kubectl
//
// Invoked through a link whose base name is one of the program names (for instance a
// symlink named `kubectl`), it runs that program directly, so `kubectl get ns` works.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	_ "time/tzdata" // for timeZone support in CronJob

	"go.etcd.io/etcd/server/v3/embed"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubeproxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl's client auth plugins
)

const usage = `usage: vmfleet-controlplane COMMAND [args]

Commands (one component per process):
  etcd                      embedded etcd server
  kube-apiserver            Kubernetes API server
  kube-controller-manager   Kubernetes controller manager
  kube-scheduler            Kubernetes scheduler
  kubelet                   Kubernetes node agent (with a CRI runtime such as containerd)
  kube-proxy                Kubernetes network proxy (Services; iptables mode)
  kubectl                   kubectl of the same version as the server
  version                   print the Kubernetes version this binary was built from

A link to this binary named after a command (e.g. "kubectl") runs that command.
`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if !isCommand(name) {
		if len(args) == 0 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	// The Kubernetes commands read their arguments from os.Args (cobra, kubectl's
	// plugin handling); make it look as if they had been run under their own name.
	os.Args = append([]string{name}, args...)

	if name != "kubectl" {
		exitWithParent()
	}

	switch name {
	case "etcd":
		os.Exit(runEtcd(args))
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kube-proxy":
		os.Exit(cli.Run(kubeproxy.NewProxyCommand()))
	case "kubectl":
		runKubectl()
	case "version", "--version", "-version":
		fmt.Println(kubeVersion)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "vmfleet-controlplane: unknown command %q\n\n%s", name, usage)
		os.Exit(2)
	}
}

// kubeVersion is stamped by build.sh with -ldflags -X (as are the version variables
// of k8s.io/component-base/version and k8s.io/client-go/pkg/version).
var kubeVersion = "unknown"

// parentPIDEnv, when set to the pid of the process that started a server component,
// makes the component stop (SIGTERM to itself, so the normal graceful shutdown runs)
// once that parent is gone. Test runs set it so that a killed test session leaves no
// control plane behind; a long-lived dev environment leaves it unset.
const parentPIDEnv = "VMFLEET_CONTROLPLANE_PARENT_PID"

func exitWithParent() {
	v := os.Getenv(parentPIDEnv)
	if v == "" {
		return
	}
	os.Unsetenv(parentPIDEnv)
	want, err := strconv.Atoi(v)
	if err != nil || want <= 1 {
		fmt.Fprintf(os.Stderr, "ignoring %s=%q: not a process id\n", parentPIDEnv, v)
		return
	}
	go func() {
		for {
			if os.Getppid() != want {
				fmt.Fprintf(os.Stderr, "parent process %d is gone; shutting down\n", want)
				_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
				time.Sleep(30 * time.Second)
				os.Exit(1)
			}
			time.Sleep(time.Second)
		}
	}()
}

func isCommand(name string) bool {
	switch name {
	case "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl":
		return true
	}
	return false
}

func runKubectl() {
	// As cmd/kubectl/kubectl.go: set the verbosity before the command is built, so
	// klog output during construction (plugins, kuberc) honours -v.
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
}

// runEtcd starts a single-member etcd with go.etcd.io/etcd/server/v3/embed and runs it
// until SIGTERM or SIGINT. Only the flags the local control plane needs are offered;
// their names and meanings are etcd's own.
func runEtcd(args []string) int {
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	var (
		name              = fs.String("name", "default", "human-readable name for this member")
		dataDir           = fs.String("data-dir", "default.etcd", "path to the data directory")
		listenClient      = fs.String("listen-client-urls", "http://127.0.0.1:2379", "comma-separated URLs to listen on for client traffic")
		advertiseClient   = fs.String("advertise-client-urls", "", "comma-separated client URLs to advertise (default: --listen-client-urls)")
		listenPeer        = fs.String("listen-peer-urls", "http://127.0.0.1:2380", "comma-separated URLs to listen on for peer traffic")
		advertisePeer     = fs.String("initial-advertise-peer-urls", "", "comma-separated peer URLs to advertise (default: --listen-peer-urls)")
		listenMetrics     = fs.String("listen-metrics-urls", "", "comma-separated URLs to serve /metrics and /health on")
		quotaBackendBytes = fs.Int64("quota-backend-bytes", 0, "backend size quota in bytes (0: etcd's default)")
		unsafeNoFsync     = fs.Bool("unsafe-no-fsync", false, "disable fsync (unsafe; for throwaway test data only)")
		logLevel          = fs.String("log-level", "warn", "debug, info, warn, error, panic or fatal")
		readyTimeout      = fs.Duration("ready-timeout", 60*time.Second, "give up if the server is not ready within this time")
	)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "etcd: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *advertiseClient == "" {
		*advertiseClient = *listenClient
	}
	if *advertisePeer == "" {
		*advertisePeer = *listenPeer
	}

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.LogLevel = *logLevel
	cfg.UnsafeNoFsync = *unsafeNoFsync
	cfg.QuotaBackendBytes = *quotaBackendBytes
	for _, u := range []struct {
		flag string
		val  string
		dst  *[]url.URL
	}{
		{"listen-client-urls", *listenClient, &cfg.ListenClientUrls},
		{"advertise-client-urls", *advertiseClient, &cfg.AdvertiseClientUrls},
		{"listen-peer-urls", *listenPeer, &cfg.ListenPeerUrls},
		{"initial-advertise-peer-urls", *advertisePeer, &cfg.AdvertisePeerUrls},
		{"listen-metrics-urls", *listenMetrics, &cfg.ListenMetricsUrls},
	} {
		urls, err := parseURLs(u.val)
		if err != nil {
			fmt.Fprintf(os.Stderr, "etcd: --%s: %v\n", u.flag, err)
			return 2
		}
		*u.dst = urls
	}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		return 1
	}
	defer e.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready to serve client requests on %s\n", *listenClient)
	case <-time.After(*readyTimeout):
		fmt.Fprintf(os.Stderr, "etcd: not ready after %s\n", *readyTimeout)
		return 1
	case <-ctx.Done():
		return 0
	}

	select {
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		return 1
	case <-e.Server.StopNotify():
		fmt.Fprintln(os.Stderr, "etcd: server stopped")
		return 1
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "etcd: shutting down")
		return 0
	}
}

func parseURLs(s string) ([]url.URL, error) {
	var urls []url.URL
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		u, err := url.Parse(part)
		if err != nil {
			return nil, err
		}
		if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("%q is not an http(s)://host:port URL", part)
		}
		urls = append(urls, *u)
	}
	return urls, nil
}
