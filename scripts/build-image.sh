#!/usr/bin/env bash
# `make image`: build vmfleet's image from the Dockerfile with buildah (no Docker
# daemon), once per machine, and print the path of its docker-archive on the last line
# of stdout (what `ctr images import` and `docker load` read).
#
# The base is $BASE_IMAGE if set (e.g. python:3.11-slim where a registry is reachable);
# otherwise a Python 3.11 base made from Debian 12 packages by build-base-image.sh.
# Nothing is pulled: the base must be in buildah's local storage.
#
# Cached under ${VMFLEET_CACHE_DIR:-~/.cache/vmfleet}/image/<key>/ where <key> hashes the
# Dockerfile, .dockerignore, pyproject.toml, README.md, the three packages' files, this
# script, the base image's ID and buildah's version: an unchanged tree prints the cached
# archive at once; a change of code rebuilds only the layers after the dependencies
# (buildah --layers keeps them). The three newest archives are kept.
#
# Environment:
#   BASE_IMAGE     base image (default: the Debian-made localhost/vmfleet-base:bookworm-py3.11)
#   IMAGE          name and tag of the result (default localhost/vmfleet:<version in pyproject.toml>)
#   VMFLEET_CACHE_DIR  cache root (default ~/.cache/vmfleet)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -n --preserve-env=BASE_IMAGE,IMAGE,VMFLEET_CACHE_DIR,HOME "$0" "$@"
fi
for tool in buildah sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-image: $tool is required (scripts/install-system-deps.sh installs it)" >&2
        exit 1
    fi
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
IMAGE="${IMAGE:-localhost/vmfleet:$version}"
# A short name is stored as localhost/<name>, what a local build is called: containerd
# and the kubelet take such a name as it is (a short one they would qualify with the
# default registry's host).
case "$IMAGE" in
    */*) full_name="$IMAGE" ;;
    *) full_name="localhost/$IMAGE" ;;
esac

cache_root="${VMFLEET_CACHE_DIR:-${HOME:-/tmp}/.cache/vmfleet}"
mkdir -p "$cache_root/image"
exec 9>"$cache_root/image/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    echo "build-image: another image build is running; waiting for it" >&2
    flock 9
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=localhost/vmfleet-base:bookworm-py3.11
    bash "$here/build-base-image.sh" "$BASE_IMAGE"
fi
base_id="$(buildah images --noheading --no-trunc --format '{{.ID}}' "$BASE_IMAGE" 2>/dev/null | head -1)"
if [ -z "$base_id" ]; then
    echo "build-image: base image $BASE_IMAGE is not in buildah's storage (nothing is pulled)" >&2
    exit 1
fi

key="$(
    {
        sha256sum Dockerfile .dockerignore pyproject.toml README.md "$here/build-image.sh"
        find vmfleet controller remote_tasks -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
            -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        echo "$IMAGE $base_id"
        buildah --version
    } | sha256sum | cut -c1-16
)"
out_dir="$cache_root/image/$key"
archive="$out_dir/vmfleet.tar"

report() {
    echo "build-image: $full_name: $(cat "$out_dir/size.txt") (uncompressed), user $(cat "$out_dir/user.txt"), no compiler" >&2
    echo "$archive"
}
if [ -s "$archive" ] && [ -s "$out_dir/size.txt" ]; then
    report
    exit 0
fi

start=$SECONDS
echo "build-image: building $full_name on $BASE_IMAGE" >&2
build_args=(--layers --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$full_name")
# pip inside the build uses this machine's pip configuration and CA certificates (an
# index or proxy of the site); they are mounted for the RUN steps, not copied in.
if [ -s /etc/pip.conf ]; then build_args+=(-v /etc/pip.conf:/etc/pip.conf:ro); fi
if [ -d /etc/ssl/certs ]; then build_args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro); fi
buildah build "${build_args[@]}" . >&2

# What the image promises: a non-root user and no compiler.
user="$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$full_name")"
if [ -z "$user" ] || [ "${user%%:*}" = "0" ] || [ "${user%%:*}" = "root" ]; then
    echo "build-image: the image runs as '${user:-root}', not as a non-root user" >&2
    exit 1
fi
ctr="$(buildah from --pull-never "$full_name")"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root="$(buildah mount "$ctr")"
for cc in cc gcc g++ c++ clang x86_64-linux-gnu-gcc-12 tcc; do
    if [ -e "$root/usr/bin/$cc" ] || [ -e "$root/usr/local/bin/$cc" ]; then
        echo "build-image: the image holds a compiler ($cc)" >&2
        exit 1
    fi
done
size_bytes="$(du -sxb "$root" | cut -f1)"
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
trap - EXIT

tmp_dir="$(mktemp -d "$cache_root/image/.tmp.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT
buildah push --quiet "$full_name" "docker-archive:$tmp_dir/vmfleet.tar:$full_name" >&2
echo "$((size_bytes / 1000000)) MB" >"$tmp_dir/size.txt"
echo "$user" >"$tmp_dir/user.txt"
echo "$full_name" >"$tmp_dir/image.txt"
chmod 755 "$tmp_dir"
rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
trap - EXIT
# Every change of the code makes a new archive: keep this one and the two before it.
find "$cache_root/image" -mindepth 1 -maxdepth 1 -type d ! -name '.*' ! -path "$out_dir" \
    -printf '%T@ %p\n' | sort -rn | tail -n +3 | cut -d' ' -f2- | xargs -r rm -rf
echo "build-image: built in $((SECONDS - start))s" >&2
report
