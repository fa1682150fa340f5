#!/usr/bin/env bash
# build-guest.sh OUTDIR
#
# Builds a tiny QEMU test guest from Debian packages only:
#   OUTDIR/vmlinuz         - the Debian kernel (from the linux-image-*-amd64 package)
#   OUTDIR/initrd.cpio.gz  - busybox-static + virtio-net modules + /init (heredoc below)
#   OUTDIR/guest.env       - KVER / package / module list actually used (for logs and tests)
#
# The kernel is not installed on the host: its package is downloaded (apt-get download) into
# a cache and unpacked (dpkg-deb -x) into a scratch directory, so nothing goes into /boot or
# /lib/modules and no initramfs or bootloader hook runs. The host's own kernel is never used.
#
# Idempotent: packages are installed only when missing, the kernel package is downloaded
# once per version; OUTDIR files are rebuilt each run and replaced atomically.  Needs root
# on Debian 12.
#
# Environment knobs:
#   KVER=<version>       use the kernel package linux-image-<version> (e.g. 6.1.0-57-amd64;
#                        default: the one the linux-image-amd64 meta package depends on)
#   KERNEL_CACHE=<dir>   where the kernel package is kept (default: OUTDIR/kernel)
#   NO_ETHTOOL=1         do not put ethtool in the initramfs (then mqt.queues= is ignored)
#   NO_INSTALL=1         never call apt-get (fail if something is missing; the kernel
#                        package must then be in the cache already)
set -euo pipefail

OUTDIR=${1:?usage: build-guest.sh OUTDIR}
log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- packages
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need_pkgs=()
for p in qemu-system-x86 busybox-static cpio xz-utils kmod; do
  installed "$p" || need_pkgs+=("$p")
done
if [ "${NO_ETHTOOL:-0}" != 1 ]; then installed ethtool || need_pkgs+=(ethtool); fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "${NO_INSTALL:-0}" = 1 ] && die "missing packages: ${need_pkgs[*]}"
  log "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A missing/stale package list makes install fail ("Unable to locate package"):
  # try once as is, then update and retry.
  if ! apt-get install -y --no-install-recommends "${need_pkgs[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${need_pkgs[@]}"
  fi
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/build-guest.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# ---------------------------------------------------------------- kernel
CACHE=${KERNEL_CACHE:-$OUTDIR/kernel}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

# Sets KPKG (linux-image-<version>) and KPKGVER (its candidate version) from apt's lists.
resolve_kernel() {
  local kver=${KVER:-}
  if [ -z "$kver" ]; then
    kver=$(apt-cache depends linux-image-amd64 2>/dev/null \
           | sed -n 's/^ *Depends: linux-image-\([^ <>]*-amd64\)$/\1/p' | head -n1)
  fi
  [ -n "$kver" ] || return 1
  KPKG=linux-image-$kver
  KPKGVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
  [ -n "$KPKGVER" ]
}
# The cached .deb of KPKG at KPKGVER, if there is one (apt writes an epoch's ':' as %3a).
cached_kernel() {
  local f="$CACHE/${KPKG}_${KPKGVER//:/%3a}_amd64.deb"
  [ -s "$f" ] && echo "$f"
}
# apt-get download into a scratch dir, then into the cache: an interrupted download leaves
# nothing behind that looks complete. apt checks the file against its signed lists.
download_kernel() {
  local dl ok=0
  dl=$(mktemp -d "$CACHE/.download.XXXXXX")
  chown _apt "$dl" 2>/dev/null || true   # apt downloads as _apt when that user can write there
  if (cd "$dl" && apt-get download -q "$KPKG=$KPKGVER" >&2) && compgen -G "$dl/*.deb" >/dev/null; then
    mv -f "$dl"/*.deb "$CACHE"/ && ok=1
  fi
  rm -rf "$dl"
  [ $ok = 1 ]
}

KDEB=""
if resolve_kernel; then
  KDEB=$(cached_kernel) || true
elif [ "${NO_INSTALL:-0}" = 1 ]; then
  # No package lists to ask: the newest cached package (of version KVER, if given).
  KDEB=$(find "$CACHE" -maxdepth 1 -name "linux-image-${KVER:-*}_*.deb" | sort -V | tail -n1)
  [ -n "$KDEB" ] || die "no linux-image-${KVER:-*} package in $CACHE and NO_INSTALL=1"
fi
if [ -z "$KDEB" ]; then
  [ "${NO_INSTALL:-0}" = 1 ] && die "${KPKG:-the kernel package} ${KPKGVER:-} is not in $CACHE and NO_INSTALL=1"
  # A missing/stale package list: update once and resolve again.
  if ! { [ -n "${KPKG:-}" ] && download_kernel; }; then
    apt-get update
    resolve_kernel || die "no kernel package ${KVER:+linux-image-$KVER }in the package lists (KVER, or the one linux-image-amd64 depends on)"
    download_kernel || die "apt-get download $KPKG=$KPKGVER failed"
  fi
  KDEB=$(cached_kernel) || die "apt-get download left no ${KPKG}_${KPKGVER}_amd64.deb in $CACHE"
  log "downloaded $(basename "$KDEB") into $CACHE"
  # Only the package in use is kept.
  find "$CACHE" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$(basename "$KDEB")" -delete
fi

KROOT=$STAGE/kernel
dpkg-deb -x "$KDEB" "$KROOT"
KVER=$(find "$KROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | head -n1) || true
[ -n "$KVER" ] || die "$(basename "$KDEB") has no lib/modules/<version>"
KIMG=$KROOT/boot/vmlinuz-$KVER
MODDIR=$KROOT/lib/modules/$KVER
[ -r "$KIMG" ] && [ -d "$MODDIR" ] || die "kernel package $(basename "$KDEB") incomplete (no boot/vmlinuz-$KVER)"
# The package ships no modules.dep (its postinst runs depmod on an installed kernel).
[ -s "$MODDIR/modules.dep" ] || depmod -b "$KROOT" "$KVER"
log "kernel $KVER ($(basename "$KDEB"))"

# ---------------------------------------------------------------- modules
# Wanted leaf modules; dependencies come from modules.dep (dependency-first
# post-order, exactly what modprobe would load).  Built-in ones are skipped.
WANT=(virtio_pci virtio_net)

declare -A DEP_OF=() PATH_OF=() SEEN=()
while IFS= read -r line; do
  m=${line%%:*}; deps=${line#*:}
  n=$(basename "$m"); n=${n%%.ko*}; n=${n//-/_}
  PATH_OF[$n]=$m
  DEP_OF[$n]=$deps
done < "$MODDIR/modules.dep"
declare -A BUILTIN=()
if [ -r "$MODDIR/modules.builtin" ]; then
  while IFS= read -r m; do n=$(basename "$m"); n=${n%%.ko*}; BUILTIN[${n//-/_}]=1; done < "$MODDIR/modules.builtin"
fi

ORDER=()
visit() {
  local n=$1 d dn
  [ -n "${SEEN[$n]:-}" ] && return 0
  SEEN[$n]=1
  if [ -n "${BUILTIN[$n]:-}" ]; then return 0; fi
  [ -n "${PATH_OF[$n]:-}" ] || die "module $n neither in modules.dep nor built-in"
  for d in ${DEP_OF[$n]}; do
    dn=$(basename "$d"); dn=${dn%%.ko*}; visit "${dn//-/_}"
  done
  ORDER+=("$n")
}
for m in "${WANT[@]}"; do visit "$m"; done
log "modules (load order): ${ORDER[*]:-<all built-in>}"

# ---------------------------------------------------------------- initramfs tree
R=$STAGE/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/mqt-modules}

# busybox-static + one symlink per applet (busybox --list-full gives paths).
cp /bin/busybox "$R/bin/busybox"
/bin/busybox --list-full | while IFS= read -r a; do
  [ "$a" = bin/busybox ] && continue
  mkdir -p "$R/$(dirname "$a")"
  ln -sf /bin/busybox "$R/$a"
done

# Modules: copied flat and uncompressed, with a load-order list for /init.
# Decompressing on the host means busybox insmod never needs xz/zstd support
# (Debian's busybox insmod does not decompress .ko.xz by itself).
: > "$R/lib/mqt-modules/order"
for n in "${ORDER[@]}"; do
  src=$MODDIR/${PATH_OF[$n]}
  dst=$R/lib/mqt-modules/$n.ko
  case "$src" in
    *.ko.xz)  xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -dcq "$src" > "$dst" ;;
    *.ko.gz)  gzip -dc "$src" > "$dst" ;;
    *.ko)     cp "$src" "$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
  echo "$n" >> "$R/lib/mqt-modules/order"
done

# Optional ethtool (dynamically linked): copy it plus the libraries ldd names,
# so /init can run `ethtool -L eth0 combined N` for mqt.queues=N.
if [ "${NO_ETHTOOL:-0}" != 1 ] && command -v ethtool >/dev/null; then
  et=$(command -v ethtool)
  cp "$et" "$R/usr/sbin/ethtool"
  for lib in $(ldd "$et" | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
fi

# /init (PID 1). Kept small on purpose; everything is busybox.
cat > "$R/init" <<'INIT'
#!/bin/sh
# mqtapd test guest /init.  Kernel command line knobs (read from /proc/cmdline,
# because dotted "mqt.x=" words are treated as module params, not init env):
#   mqt.ip=A.B.C.D/NN   address for eth0 (required for networking)
#   mqt.peer=A.B.C.D    host side of the tap to ping
#   mqt.count=N         pings to send (default 10), one every ~0.2 s
#   mqt.min=N           replies needed for MQT-PING-OK (default: N = count)
#   mqt.queues=N        ethtool -L eth0 combined N (only if ethtool is in the initrd)
#   mqt.hold=1          ping forever (until the host kills QEMU)
#   mqt.shell=1         drop to a shell on the console instead of powering off
# Every line meant for the host starts with "MQT-".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The initramfs ships a /dev/console node, but re-open it after devtmpfs
# in case the kernel started us without one.
exec </dev/console >/dev/console 2>&1
# Keep kernel printk off the serial console so MQT- lines are not interleaved.
dmesg -n 1

IP= PEER= COUNT=10 MIN= QUEUES= HOLD=0 DOSHELL=0
for w in $(cat /proc/cmdline); do
  case "$w" in
    mqt.ip=*)     IP=${w#*=} ;;
    mqt.peer=*)   PEER=${w#*=} ;;
    mqt.count=*)  COUNT=${w#*=} ;;
    mqt.min=*)    MIN=${w#*=} ;;
    mqt.queues=*) QUEUES=${w#*=} ;;
    mqt.hold=*)   HOLD=${w#*=} ;;
    mqt.shell=*)  DOSHELL=${w#*=} ;;
  esac
done
: "${MIN:=$COUNT}"

finish() {   # $1 = exit status to report
  echo "MQT-DONE $1"
  if [ "$DOSHELL" = 1 ]; then exec setsid cttyhack sh; fi
  sync
  poweroff -f       # ACPI power off: QEMU exits
  sleep 2
  reboot -f         # fallback: with -no-reboot QEMU exits on reset too
}

# Leading newline: firmware/kernel leave escape sequences without a newline on
# the serial line, which would otherwise prefix the first MQT- line.
echo
echo "MQT-BOOT kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) uptime=$(cut -d' ' -f1 /proc/uptime)"

# Modules in dependency order (computed on the host from modules.dep).
while read -r m; do
  insmod "/lib/mqt-modules/$m.ko" || echo "MQT-ERROR insmod $m"
done < /lib/mqt-modules/order

# virtio_net probes synchronously, but give udev-less PCI binding a moment.
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n+1)); done
[ -e /sys/class/net/eth0 ] || { echo "MQT-ERROR no eth0"; finish 1; }

ip link set lo up
ip link set eth0 up
[ -n "$IP" ] && ip addr add "$IP" dev eth0
# virtio_net enables min(vCPUs, max queue pairs) pairs by default; the host
# sees the rest as detached tap queues.  ethtool can change that.
if [ -n "$QUEUES" ]; then
  if command -v ethtool >/dev/null; then
    ethtool -L eth0 combined "$QUEUES" || echo "MQT-ERROR ethtool -L combined $QUEUES"
  else
    echo "MQT-WARN no ethtool, mqt.queues ignored"
  fi
fi
# sysfs has one rx-N/tx-N dir per *active* queue.
rxq=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)
txq=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)
echo "MQT-READY ip=$IP peer=$PEER rxq=$rxq txq=$txq mac=$(cat /sys/class/net/eth0/address) uptime=$(cut -d' ' -f1 /proc/uptime)"

[ -n "$PEER" ] || finish 0

# One ping per iteration so every result is reported and a lost reply
# costs at most 1 s (-W 1).
i=0 ok=0
while [ "$HOLD" = 1 ] || [ $i -lt "$COUNT" ]; do
  i=$((i+1))
  if ping -c 1 -W 1 "$PEER" >/dev/null 2>&1; then ok=$((ok+1)); r=ok; else r=lost; fi
  echo "MQT-PING $i $r"
  usleep 200000
done
if [ $ok -ge "$MIN" ]; then echo "MQT-PING-OK $ok"; finish 0
else echo "MQT-PING-FAIL $ok/$i"; finish 1; fi
INIT
chmod 0755 "$R/init"
# The kernel opens /dev/console for init *before* /init can mount devtmpfs.
mknod -m 0600 "$R/dev/console" c 5 1
mknod -m 0666 "$R/dev/null" c 1 3
echo "$KVER" > "$R/etc/mqt-kver"

# Reproducible archive: fixed mtimes, sorted names, newc format, root-owned.
find "$R" -exec touch -h -d @0 {} +
( cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet ) \
  | gzip -9n > "$STAGE/initrd.cpio.gz"

# ---------------------------------------------------------------- publish
cp "$KIMG" "$STAGE/vmlinuz"
cat > "$STAGE/guest.env" <<EOF
KVER=$KVER
KERNEL_PACKAGE=$(basename "$KDEB")
MODULES="${ORDER[*]}"
ETHTOOL=$([ -x "$R/usr/sbin/ethtool" ] && echo yes || echo no)
EOF
for f in vmlinuz initrd.cpio.gz guest.env; do
  mv -f "$STAGE/$f" "$OUTDIR/$f.tmp.$$" && mv -f "$OUTDIR/$f.tmp.$$" "$OUTDIR/$f"
done
log "wrote $OUTDIR/vmlinuz $OUTDIR/initrd.cpio.gz ($(du -k "$OUTDIR/initrd.cpio.gz" | cut -f1) KiB)"
