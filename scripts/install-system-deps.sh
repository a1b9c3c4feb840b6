#!/usr/bin/env bash
# Install the Debian packages vmfleet's local environment and e2e tests need:
# OpenSSH (the fake "VMs"), Redis and RabbitMQ (the brokers), util-linux (unshare),
# procps (pgrep/ps), iproute2 (ss), sudo (the become e2e tests run sudo on the VMs),
# prometheus (the server and promtool, for the metrics e2e tests and `promtool check
# rules` on the chart's alerts); for the image and the local node: buildah and
# mmdebstrap (`make image`), containerd, runc and the CNI plugins (the kubelet's
# container runtime: loopback for the host-network node, bridge and host-local for the
# pod-network cluster), socat (its loopback relay into the cluster's network namespace)
# and iptables (kube-proxy's rules, inside that namespace only).
#
# Idempotent: does nothing when everything is present; runs `apt-get update` once, only
# when something is missing. System services are neither started nor left enabled:
# the project starts its own server processes (vmfleet/dev/sshd.py, brokers.py).
#
# Usage: scripts/install-system-deps.sh        (root, or a user with sudo)
set -euo pipefail

PACKAGES=(
    openssh-server
    openssh-client
    redis-server
    redis-tools
    rabbitmq-server
    util-linux
    procps
    iproute2
    sudo
    ca-certificates
    prometheus
    buildah
    mmdebstrap
    containerd
    runc
    containernetworking-plugins
    socat
    iptables
)
# Services that a package's postinst may have started or enabled.
SERVICES=(ssh redis-server rabbitmq-server epmd prometheus containerd)

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "install-system-deps: must run as root (or with sudo available)" >&2
    exit 1
fi

# Leave no system service running or enabled (policy-rc.d covers invoke-rc.d, but a
# postinst may still enable units, e.g. epmd.socket from erlang-base).
disable_system_services() {
    local svc unit now
    for svc in "${SERVICES[@]}"; do
        if command -v systemctl >/dev/null 2>&1; then
            # Without a running systemd, `disable` still removes the unit symlinks offline.
            now=()
            if [ -d /run/systemd/system ]; then now=(--now); fi
            for unit in "$svc.service" "$svc.socket"; do
                "${SUDO[@]}" systemctl disable "${now[@]}" "$unit" >/dev/null 2>&1 || true
            done
        fi
        if command -v update-rc.d >/dev/null 2>&1 && [ -e "/etc/init.d/$svc" ]; then
            "${SUDO[@]}" update-rc.d -f "$svc" disable >/dev/null 2>&1 || true
        fi
    done
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    disable_system_services
    echo "install-system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

echo "install-system-deps: installing ${missing[*]}"

# Forbid invoke-rc.d from starting services during the install (exit 101 = "action
# forbidden"). Keep any policy-rc.d that was already there and put it back afterwards.
POLICY=/usr/sbin/policy-rc.d
policy_backup=""
if [ -e "$POLICY" ]; then
    policy_backup="$(mktemp)"
    "${SUDO[@]}" cp -p "$POLICY" "$policy_backup"
fi
restore_policy() {
    if [ -n "$policy_backup" ]; then
        "${SUDO[@]}" cp -p "$policy_backup" "$POLICY"
        rm -f "$policy_backup"
    else
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
"${SUDO[@]}" chmod 755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

disable_system_services

# Daemons started by a postinst outside the init system: stop only the system-wide ones
# (run by the packages' system users, or the system sshd/rabbitmq by their pid files).
for user in rabbitmq redis epmd prometheus; do
    if id "$user" >/dev/null 2>&1; then
        "${SUDO[@]}" pkill -TERM -u "$user" >/dev/null 2>&1 || true
    fi
done
if [ -s /run/sshd.pid ]; then
    "${SUDO[@]}" kill -TERM "$(cat /run/sshd.pid)" >/dev/null 2>&1 || true
fi

echo "install-system-deps: done"
