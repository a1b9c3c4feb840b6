#!/usr/bin/env bash
# Build the local cluster's DNS server, vmfleet-coredns (CoreDNS from its Go module at
# the version coredns/go.mod pins, with the plugins coredns/main.go links), once per
# machine, and print its path on the last line of stdout.
#
# Cached, as build.sh caches the control plane, under
#   ${VMFLEET_CACHE_DIR:-$HOME/.cache/vmfleet}/coredns/<key>/vmfleet-coredns
# where <key> hashes coredns/go.mod, coredns/go.sum, coredns/main.go, this script,
# `go version` and the platform: an unchanged tree prints the cached path at once.
#
# Needs only Go: modules come through the normal module proxy (GOPROXY).
# Environment:
#   VMFLEET_CACHE_DIR         cache root (default ~/.cache/vmfleet)
#   VMFLEET_CONTROLPLANE_JOBS parallel compile jobs, `go build -p` (default 2)
#   GO                        the go command (default: go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/coredns"

GO="${GO:-go}"
if ! command -v "$GO" >/dev/null 2>&1; then
    echo "build-coredns.sh: Go is required to build CoreDNS (no '$GO' on PATH)" >&2
    exit 1
fi
export GO111MODULE=on
export CGO_ENABLED="${CGO_ENABLED:-0}"

key="$(
    {
        sha256sum go.mod go.sum main.go "$here/build-coredns.sh"
        "$GO" version
        echo "$("$GO" env GOOS)/$("$GO" env GOARCH) cgo=$CGO_ENABLED"
    } | sha256sum | cut -c1-16
)"
cache_root="${VMFLEET_CACHE_DIR:-${HOME:-/tmp}/.cache/vmfleet}"
out_dir="$cache_root/coredns/$key"
bin="$out_dir/vmfleet-coredns"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache_root/coredns"
exec 9>"$cache_root/coredns/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    echo "build-coredns.sh: another build is running; waiting for it" >&2
    flock 9
fi
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

start=$SECONDS
echo "build-coredns.sh: building CoreDNS into $out_dir (first time on this machine)" >&2
"$GO" mod download
version="$("$GO" list -m -f '{{.Version}}' github.com/coredns/coredns)"
tmp_dir="$(mktemp -d "$cache_root/coredns/.tmp.XXXXXX")"
chmod 755 "$tmp_dir"
trap 'rm -rf "$tmp_dir"' EXIT
"$GO" build \
    -p "${VMFLEET_CONTROLPLANE_JOBS:-2}" \
    -trimpath \
    -buildvcs=false \
    -ldflags "-s -w" \
    -o "$tmp_dir/vmfleet-coredns" \
    .
# Smoke test: the binary runs and lists the plugins it was built with.
if ! "$tmp_dir/vmfleet-coredns" -plugins | grep -qx 'kubernetes'; then
    echo "build-coredns.sh: the built binary has no kubernetes plugin" >&2
    exit 1
fi
rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
trap - EXIT
echo "build-coredns.sh: built CoreDNS $version ($(du -h "$bin" | cut -f1)) in $((SECONDS - start))s" >&2
echo "$bin"
