#!/usr/bin/env bash
# Build the bundled broker's image (charts/vmfleet `broker.bundled.image`) from Debian
# 12's redis-server, for clusters that can pull no image (the local pod-network cluster
# of vmfleet/dev/cluster.py), once per machine; print its docker-archive's path on the
# last line of stdout (what `ctr images import` reads; image.txt beside it names it).
#
# The root filesystem comes from mmdebstrap (Debian's Essential set plus redis-server,
# this machine's own apt sources), committed with buildah: no Entrypoint, so the chart's
# `args: [redis-server, ...]` is the command; user redis (Debian's package makes it).
# As the official redis image is built, protected mode is off (Debian's build keeps it
# on, which refuses every client but loopback's, i.e. every other pod): a wrapper
# /usr/local/bin/redis-server (first on PATH) starts Debian's with a config file
# holding `protected-mode no`, then the chart's own options.
# Cached under ${VMFLEET_CACHE_DIR:-~/.cache/vmfleet}/redis-image/<key>/, where <key>
# hashes this script and the redis-server version apt offers.
#
# Usage: scripts/build-redis-image.sh [IMAGE]   (default localhost/vmfleet-redis:7-bookworm)
# Needs: root (or sudo), mmdebstrap, buildah.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${1:-localhost/vmfleet-redis:7-bookworm}"
SUITE=bookworm

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -n --preserve-env=VMFLEET_CACHE_DIR,HOME "$0" "$@"
fi

key="$(
    {
        sha256sum "$here/build-redis-image.sh"
        echo "$IMAGE"
        apt-cache policy redis-server 2>/dev/null | grep -E 'Candidate' || true
    } | sha256sum | cut -c1-16
)"
cache_root="${VMFLEET_CACHE_DIR:-${HOME:-/tmp}/.cache/vmfleet}"
out_dir="$cache_root/redis-image/$key"
archive="$out_dir/redis.tar"
if [ -s "$archive" ]; then
    echo "$archive"
    exit 0
fi
mkdir -p "$cache_root/redis-image"
exec 9>"$cache_root/redis-image/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    echo "build-redis-image: another build is running; waiting for it" >&2
    flock 9
fi
if [ -s "$archive" ]; then
    echo "$archive"
    exit 0
fi

sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ] && grep -qv '^\s*#' "$f"; then sources="$f"; break; fi
done
if [ -z "$sources" ]; then
    echo "build-redis-image: no apt sources found in /etc/apt" >&2
    exit 1
fi

start=$SECONDS
tmp_dir="$(mktemp -d "$cache_root/redis-image/.tmp.XXXXXX")"
ctr=""
trap '[ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$tmp_dir"' EXIT
echo "build-redis-image: mmdebstrap $SUITE (redis-server) from $sources" >&2
mmdebstrap --variant=essential --include=redis-server,passwd \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    --customize-hook='mkdir -p "$1"/data && chroot "$1" chown redis:redis /data' \
    --customize-hook='printf "protected-mode no\n" >"$1"/usr/local/etc/redis-container.conf' \
    --customize-hook='printf "#!/bin/sh\nexec /usr/bin/redis-server /usr/local/etc/redis-container.conf \"\$@\"\n" >"$1"/usr/local/bin/redis-server' \
    --customize-hook='chmod 755 "$1"/usr/local/bin/redis-server && chmod 644 "$1"/usr/local/etc/redis-container.conf' \
    "$SUITE" "$tmp_dir/rootfs.tar" "$sources" >&2
redis_uid="$(tar -xOf "$tmp_dir/rootfs.tar" ./etc/passwd | awk -F: '$1 == "redis" {print $3":"$4}')"
if [ -z "$redis_uid" ]; then
    echo "build-redis-image: no redis user in the root filesystem" >&2
    exit 1
fi
ctr="$(buildah from scratch)"
buildah add "$ctr" "$tmp_dir/rootfs.tar" / >/dev/null
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --user "$redis_uid" \
    --workingdir /data \
    --cmd redis-server \
    "$ctr"
buildah commit --rm --quiet "$ctr" "$IMAGE" >/dev/null
ctr=""
rm -f "$tmp_dir/rootfs.tar"
buildah push --quiet "$IMAGE" "docker-archive:$tmp_dir/redis.tar:$IMAGE" >&2
echo "$IMAGE" >"$tmp_dir/image.txt"
chmod 755 "$tmp_dir"
rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
trap - EXIT
echo "build-redis-image: $IMAGE built in $((SECONDS - start))s" >&2
echo "$archive"
