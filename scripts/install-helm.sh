#!/usr/bin/env bash
# Build helm from its Go module once per machine and print its path on the last line of
# stdout (as tests/e2e/controlplane/build.sh does for the control plane).
#
# The binary is cached under
#   ${VMFLEET_CACHE_DIR:-$HOME/.cache/vmfleet}/helm/<version>-<key>/helm
# where <key> covers this script, `go version` and the target platform. Modules come
# through the normal Go module proxy (GOPROXY); nothing else is downloaded.
#
# Environment:
#   VMFLEET_HELM_VERSION  helm version to build (default below)
#   VMFLEET_CACHE_DIR     cache root (default ~/.cache/vmfleet)
#   GO                    the go command (default: go)
set -euo pipefail

HELM_VERSION="${VMFLEET_HELM_VERSION:-v3.22.0}"
GO="${GO:-go}"
if ! command -v "$GO" >/dev/null 2>&1; then
    echo "install-helm.sh: Go is required to build helm (no '$GO' on PATH)" >&2
    exit 1
fi
export GO111MODULE=on
export CGO_ENABLED="${CGO_ENABLED:-0}"

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
key="$(
    {
        sha256sum "$script"
        "$GO" version
        echo "$("$GO" env GOOS)/$("$GO" env GOARCH) cgo=$CGO_ENABLED"
    } | sha256sum | cut -c1-12
)"
cache_root="${VMFLEET_CACHE_DIR:-${HOME:-/tmp}/.cache/vmfleet}"
out_dir="$cache_root/helm/$HELM_VERSION-$key"
bin="$out_dir/helm"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache_root/helm"
exec 9>"$cache_root/helm/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    echo "install-helm.sh: another build is running; waiting for it" >&2
    flock 9
fi
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

start=$SECONDS
echo "install-helm.sh: building helm $HELM_VERSION into $out_dir (first time on this machine)" >&2
tmp_dir="$(mktemp -d "$cache_root/helm/.tmp.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

# Stamp versions as helm's Makefile does: helm's own, and the Kubernetes version that
# `helm template`/`lint` assume (client-go v0.N.x -> Kubernetes 1.N), else it says 1.20.
gomod="$("$GO" mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
client_go="$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$gomod")"
if [[ ! "$client_go" =~ ^v0\.([0-9]+)\. ]]; then
    echo "install-helm.sh: cannot find helm's k8s.io/client-go version in $gomod" >&2
    exit 1
fi
k8s_minor="${BASH_REMATCH[1]}"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

# `go install pkg@version` builds in module mode from the released module, ignoring any
# go.mod around us.
GOBIN="$tmp_dir" "$GO" install \
    -p "${VMFLEET_HELM_JOBS:-2}" \
    -trimpath \
    -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

reported="$("$tmp_dir/helm" version --template '{{.Version}}')"
if [[ "$reported" != "$HELM_VERSION" ]]; then
    echo "install-helm.sh: built helm reports '$reported', expected '$HELM_VERSION'" >&2
    exit 1
fi

rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
trap - EXIT
echo "install-helm.sh: built helm $HELM_VERSION in $((SECONDS - start))s" >&2
echo "$bin"
