#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian 12 packages, for `make image` on a machine
# that can pull no image: python3 (3.11), pip and the tools the Dockerfile uses, nothing
# else (no compilers). The Dockerfile's default base, python:3.11-slim, is what users
# build on; this one stands in for it where no registry is reachable.
#
# The root filesystem comes from mmdebstrap, with this machine's own apt sources; it is
# Debian's Essential set plus the packages below (no apt, no perl beyond perl-base, no
# glibc iconv modules: Python's codecs do not use them, 9 MB),
# /usr merged by mmdebstrap's own hook (so no usrmerge, which would pull in perl), then
# committed into buildah's local storage (containers-storage) as $BASE_IMAGE. Nothing is
# pulled. Idempotent: an existing $BASE_IMAGE built from the same inputs is kept.
#
# Usage: scripts/build-base-image.sh [IMAGE]   (default localhost/vmfleet-base:bookworm-py3.11)
# Needs: root (or sudo), mmdebstrap, buildah.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_IMAGE="${1:-localhost/vmfleet-base:bookworm-py3.11}"
SUITE=bookworm
PACKAGES=python3,python3-pip,python-is-python3,ca-certificates,passwd,tzdata

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -n "$0" "$@"
fi

# The base's inputs: this script and the suite's package versions as apt sees them now.
# The script's content, not its path: checkouts in other directories share one base
# (with the path in the key, two checkouts rebuilt and re-tagged it in turn).
key="$(
    {
        sha256sum <"$here/build-base-image.sh"
        apt-cache policy python3 python3-pip 2>/dev/null | grep -E 'Candidate' || true
    } | sha256sum | cut -c1-16
)"
existing="$(buildah inspect --type image --format '{{index .ImageAnnotations "io.vmfleet.base.key"}}' \
    "$BASE_IMAGE" 2>/dev/null || true)"
if [ "$existing" = "$key" ]; then
    echo "build-base-image: $BASE_IMAGE is up to date" >&2
    exit 0
fi

# This machine's apt sources (one-line or deb822), so the base comes from the same mirror.
sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ] && grep -qv '^\s*#' "$f"; then sources="$f"; break; fi
done
if [ -z "$sources" ]; then
    echo "build-base-image: no apt sources found in /etc/apt" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
echo "build-base-image: mmdebstrap $SUITE ($PACKAGES) from $sources" >&2
mmdebstrap --variant=essential --include="$PACKAGES" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    --customize-hook='find "$1"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +' \
    "$SUITE" "$work/rootfs.tar" "$sources" >&2

ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --annotation "io.vmfleet.base.key=$key" \
    "$ctr"
buildah commit --rm --quiet "$ctr" "$BASE_IMAGE" >/dev/null
trap 'rm -rf "$work"' EXIT
echo "build-base-image: $BASE_IMAGE built in $((SECONDS - start))s" >&2
