#!/usr/bin/env bash
# Installs what building and testing mqtapd needs on Debian/Ubuntu, and nothing that is
# already there. Safe to run again. The Swift 6 toolchain itself is not an apt package:
# it must be on PATH (https://www.swift.org/install/linux/).
set -euo pipefail

packages=(libmicrohttpd-dev libjansson-dev pkg-config iproute2 python3 python3-venv curl gcc libc6-dev util-linux wrk systemd buildah debootstrap valgrind binutils linux-perf
          # The lease test's QEMU guest (scripts/build-guest.sh): a Debian kernel, busybox, and
          # ethtool for the guest's queue count.
          qemu-system-x86 linux-image-amd64 busybox-static cpio ethtool xz-utils kmod
          # The forward test's traffic between two namespaces.
          iperf3 iputils-ping
          # promtool, to check the /metrics exposition.
          prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # INITRD=No: the kernel package's hook builds no initrd for this host (the guest's is ours).
  DEBIAN_FRONTEND=noninteractive INITRD=No $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v swift >/dev/null 2>&1; then
  for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
    [ -x "$d/swift" ] && { echo "install-deps: add $d to PATH" >&2; break; }
  done
  echo "install-deps: no swift on PATH; install a Swift 6 toolchain first" >&2
  exit 1
fi
