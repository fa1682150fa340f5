#!/usr/bin/env bash
# install-deps.sh [--test]
#
# Installs on Debian 12 what is missing of:
#   (no option)  what building and running mqtapd needs: libmicrohttpd and jansson headers,
#                pkg-config, iproute2, and what the Swift toolchain needs to compile and link
#                (binutils' ld.gold, the C library's and GCC's crt files and libstdc++ for
#                --static-swift-stdlib, git for SwiftPM's dependencies, the shared libraries
#                swift-build and swift-frontend load). `make run` and `make install`.
#   --test       also the tools of the tests and benchmarks (`make test`, `make bench`): wrk,
#                buildah, debootstrap, valgrind, linux-perf, QEMU and what the guest is made
#                of (scripts/build-guest.sh downloads the kernel itself, into a cache),
#                iperf3, ping, python3-venv, curl, a C compiler, systemd's tools, libvirt's
#                daemon and clients, podman, and promtool.
#
# Safe to run again. Never starts or enables a service: while apt-get runs, a policy-rc.d
# refuses every start (the host's own policy-rc.d, if any, is put back afterwards), and a
# systemd unit or init script that a package enabled is disabled again (as `systemctl
# disable` would: its package keeps it disabled on upgrades). promtool is taken out of
# Debian's prometheus package into .build-tools/bin; the Prometheus server is not installed.
#
# The Swift 6 toolchain itself is not an apt package: it must be on PATH
# (https://www.swift.org/install/linux/).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

test_tools=0
case "${1:-}" in
  "") ;;
  --test) test_tools=1 ;;
  *) echo "usage: install-deps.sh [--test]" >&2; exit 2 ;;
esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
log() { echo "install-deps: $*" >&2; }

# GCC's version (its crt files and libstdc++, which clang finds under /usr/lib/gcc/*/N):
# the one Debian's gcc package depends on.
gccv=$(apt-cache depends gcc 2>/dev/null | sed -n 's/^ *Depends: gcc-\([0-9][0-9]*\)$/\1/p' | head -n1)
if [ -z "$gccv" ]; then
  $sudo apt-get update -qq
  gccv=$(apt-cache depends gcc 2>/dev/null | sed -n 's/^ *Depends: gcc-\([0-9][0-9]*\)$/\1/p' | head -n1)
fi
[ -n "$gccv" ] || { log "cannot tell GCC's version from apt-cache depends gcc"; exit 1; }

packages=(libmicrohttpd-dev libjansson-dev pkg-config iproute2
          # Linking a Swift binary: the toolchain's clang drives ld.gold over the C library's
          # and GCC's crt files; --static-swift-stdlib links libstdc++.
          binutils libc6-dev "libgcc-$gccv-dev" "libstdc++-$gccv-dev"
          # SwiftPM fetches the package's dependencies with git; swift-build and
          # swift-frontend load these libraries.
          git ca-certificates libcurl4 libxml2 libsqlite3-0 libncurses6 zlib1g)
if ((test_tools)); then
  packages+=(python3 python3-venv curl gcc util-linux wrk systemd buildah debootstrap valgrind linux-perf
             # The lease test's QEMU guest (scripts/build-guest.sh): busybox, ethtool for the
             # guest's queue count, and what unpacks the Debian kernel package.
             qemu-system-x86 busybox-static cpio ethtool xz-utils kmod
             # The forward test's traffic between two namespaces.
             iperf3 iputils-ping
             # libvirt and podman handing a leased device to a guest or a container.
             libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
             podman containernetworking-plugins runc)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Symlinks that enable a systemd unit (in /etc/systemd/{system,user}; masks point to
# /dev/null and are left alone) and sysvinit start links.
enabled_links() {
  { find /etc/systemd/system /etc/systemd/user -type l ! -lname /dev/null 2>/dev/null || true
    ls -1d /etc/rc[0-6S].d/S* 2>/dev/null || true; } | LC_ALL=C sort
}

POLICY=/usr/sbin/policy-rc.d
policy_state=host   # host: untouched; saving: the host's file is being moved aside; ours
saved_policy=""
restore_policy() {
  case $policy_state in
    saving)
      if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then $sudo rm -f "$saved_policy"
      else $sudo mv -f "$saved_policy" "$POLICY"; fi ;;
    ours)
      if [ -n "$saved_policy" ]; then $sudo mv -f "$saved_policy" "$POLICY"
      else $sudo rm -f "$POLICY"; fi ;;
  esac
  policy_state=host
}

if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  before=$(enabled_links)
  dirs_before=$(find /etc/systemd/system /etc/systemd/user -type d 2>/dev/null | LC_ALL=C sort || true)
  # invoke-rc.d and deb-systemd-invoke ask /usr/sbin/policy-rc.d before starting anything;
  # 101 is "action forbidden". Only for this apt-get: the host's own file comes back after.
  trap 'restore_policy' EXIT
  trap 'exit 130' INT TERM
  if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
    policy_state=saving
    saved_policy=$($sudo mktemp "$POLICY.saved.XXXXXX")
    $sudo mv -f "$POLICY" "$saved_policy"
  fi
  policy_state=ours
  printf '#!/bin/sh\n# scripts/install-deps.sh: no service starts while it installs packages.\nexit 101\n' \
    | $sudo tee "$POLICY" >/dev/null
  $sudo chmod 0755 "$POLICY"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  restore_policy
  trap - EXIT INT TERM
  # What the packages' postinst enabled (deb-systemd-helper enable, update-rc.d defaults)
  # is disabled again: nothing runs at the next boot that did not before.
  declare -A initd_done=()
  while IFS= read -r link; do
    [ -n "$link" ] || continue
    case "$link" in
      /etc/rc?.d/S*)
        name=${link##*/S[0-9][0-9]}
        [ -z "${initd_done[$name]:-}" ] || continue
        initd_done[$name]=1
        log "disabling the init script $name (a package enabled it)"
        $sudo update-rc.d "$name" disable >/dev/null 2>&1 || $sudo rm -f /etc/rc?.d/S[0-9][0-9]"$name" ;;
      *)
        log "disabling $(basename "$link") (a package enabled it: $link)"
        $sudo rm -f "$link" ;;
    esac
  done < <(LC_ALL=C comm -13 <(echo "$before") <(enabled_links))
  # And the *.wants directories made for them, once empty.
  LC_ALL=C comm -13 <(echo "$dirs_before") \
      <(find /etc/systemd/system /etc/systemd/user -type d 2>/dev/null | LC_ALL=C sort || true) \
    | sort -r | while IFS= read -r d; do [ -n "$d" ] && $sudo rmdir "$d" 2>/dev/null || true; done
fi

# promtool (to check the /metrics exposition) without the Prometheus server: its package is
# downloaded and only /usr/bin/promtool is kept, in .build-tools/bin (found there by the
# tests when promtool is not on PATH).
if ((test_tools)) && ! command -v promtool >/dev/null 2>&1 && [ ! -x "$ROOT/.build-tools/bin/promtool" ]; then
  log "extracting promtool from Debian's prometheus package into .build-tools/bin"
  dl=$(mktemp -d "${TMPDIR:-/tmp}/install-deps.XXXXXX")
  # apt downloads as _apt when that user can write there.
  [ -n "$sudo" ] || chown _apt "$dl" 2>/dev/null || true
  (cd "$dl" && apt-get download -qq prometheus >/dev/null) \
    || { $sudo apt-get update -qq && (cd "$dl" && apt-get download -qq prometheus >/dev/null); }
  dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -C "$dl" ./usr/bin/promtool
  mkdir -p "$ROOT/.build-tools/bin"
  mv -f "$dl/usr/bin/promtool" "$ROOT/.build-tools/bin/promtool"
  rm -rf "$dl"
fi

if ! command -v swift >/dev/null 2>&1; then
  for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
    [ -x "$d/swift" ] && { log "add $d to PATH"; break; }
  done
  log "no swift on PATH; install a Swift 6 toolchain first"
  exit 1
fi
# The toolchain's own programs find every library they load.
swiftbin=$(dirname "$(readlink -f "$(command -v swift)")")
for b in swift-frontend swift-build swift-driver; do
  if [ -x "$swiftbin/$b" ] && nf=$(ldd "$swiftbin/$b" 2>/dev/null | grep 'not found'); then
    log "$swiftbin/$b cannot load: $(echo "$nf" | awk '{print $1}' | tr '\n' ' ')"
    exit 1
  fi
done
