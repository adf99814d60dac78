#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use: the real NBD clients (qemu-io,
# qemu-img, qemu-nbd, qemu-storage-daemon, nbdinfo, nbdcopy, python3-libnbd, fio's nbd engine),
# and for the full-disk tests a small ext4 on a loop device (mkfs.ext4, mount, losetup) and
# fincore; for the container image, umoci (builds it without an engine) and runc (runs it);
# tmux, the terminal the kubectl plugin's progress bar is tested in; containerd and the CNI
# plugins, which run the chart's pods on real test nodes (with runc and the Go-built kubelet).
# Does nothing when they are all present.
set -euo pipefail
pkgs=(qemu-utils qemu-system-common libnbd-bin python3-libnbd fio procps iproute2 e2fsprogs mount util-linux util-linux-extra umoci runc tmux containerd containernetworking-plugins)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
