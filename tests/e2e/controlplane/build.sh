#!/usr/bin/env bash
# Build the local control plane binary (etcd + kube-apiserver + kube-controller-manager
# + kube-scheduler + kubelet + kubectl in one executable) and the local node's pause
# binary once per machine, and print the control plane's path on the last line of stdout.
#
# The binary is cached under
#   ${VMFLEET_CACHE_DIR:-$HOME/.cache/vmfleet}/controlplane/<key>/vmfleet-controlplane
# with a `kubectl` symlink and the static `pause` binary beside it. <key> is derived from go.mod, go.sum, main.go,
# this script, `go version` and the target platform, so a change to any of them builds
# a new binary and an unchanged tree prints the cached path without building.
#
# Needs only Go: modules come through the normal module proxy (GOPROXY).
# Environment:
#   VMFLEET_CACHE_DIR         cache root (default ~/.cache/vmfleet)
#   VMFLEET_CONTROLPLANE_JOBS parallel compile jobs, `go build -p` (default 2)
#   GO                        the go command (default: go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

GO="${GO:-go}"
if ! command -v "$GO" >/dev/null 2>&1; then
    echo "build.sh: Go is required to build the control plane (no '$GO' on PATH)" >&2
    exit 1
fi

# Module mode with go.mod/go.sum as committed (-mod=readonly is the default), a
# static binary, and no VCS stamping (the repository's state is not the binary's).
export GO111MODULE=on
export CGO_ENABLED="${CGO_ENABLED:-0}"

goos="$("$GO" env GOOS)"
goarch="$("$GO" env GOARCH)"
key="$(
    {
        sha256sum go.mod go.sum main.go pause/main.go build.sh
        "$GO" version
        echo "$goos/$goarch cgo=$CGO_ENABLED"
    } | sha256sum | cut -c1-16
)"

cache_root="${VMFLEET_CACHE_DIR:-${HOME:-/tmp}/.cache/vmfleet}"
out_dir="$cache_root/controlplane/$key"
bin="$out_dir/vmfleet-controlplane"

built() { [[ -x "$bin" && -L "$out_dir/kubectl" && -x "$out_dir/pause" ]]; }

if built; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache_root/controlplane"
# One build at a time per cache (parallel test sessions, two shells).
exec 9>"$cache_root/controlplane/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    echo "build.sh: another build is running; waiting for it" >&2
    flock 9
fi
if built; then
    echo "$bin"
    exit 0
fi

start=$SECONDS
echo "build.sh: building the control plane into $out_dir (first time on this machine; several minutes)" >&2

"$GO" mod download
kube_version="$("$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)"
# Reproducible: the build date is the release's publication time, not the clock.
build_date="$("$GO" list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
if [[ ! "$kube_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+ ]]; then
    echo "build.sh: cannot parse the k8s.io/kubernetes version '$kube_version'" >&2
    exit 1
fi
major="${BASH_REMATCH[1]}"
minor="${BASH_REMATCH[2]}"

# As kubernetes' hack/lib/version.sh does: stamp both version packages. The source is
# the released module archive, so the tree state is "archive" and there is no commit.
ldflags="-s -w -X main.kubeVersion=$kube_version"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$kube_version"
    ldflags+=" -X $pkg.gitMajor=$major"
    ldflags+=" -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=archive"
    ldflags+=" -X $pkg.gitCommit="
    ldflags+=" -X $pkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
done

tmp_dir="$(mktemp -d "$cache_root/controlplane/.tmp.XXXXXX")"
chmod 755 "$tmp_dir"
trap 'rm -rf "$tmp_dir"' EXIT

"$GO" build \
    -p "${VMFLEET_CONTROLPLANE_JOBS:-2}" \
    -trimpath \
    -buildvcs=false \
    -ldflags "$ldflags" \
    -o "$tmp_dir/vmfleet-controlplane" \
    .

# The pod sandbox of the local node (vmfleet/dev/node.py), a static binary of its own.
"$GO" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp_dir/pause" ./pause

# Smoke test before publishing: the binary runs and reports the stamped version.
reported="$("$tmp_dir/vmfleet-controlplane" version)"
if [[ "$reported" != "$kube_version" ]]; then
    echo "build.sh: built binary reports version '$reported', expected '$kube_version'" >&2
    exit 1
fi
ln -s vmfleet-controlplane "$tmp_dir/kubectl"

# Publish atomically: a reader sees either no directory or a complete one.
rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
trap - EXIT

size="$(du -h "$bin" | cut -f1)"
echo "build.sh: built $kube_version ($size) in $((SECONDS - start))s" >&2
echo "$bin"
