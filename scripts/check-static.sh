#!/usr/bin/env bash
# check-static.sh BIN...
#
# Checks that each binary runs without the Swift toolchain, as `make install` puts it on a
# host that has none (the release build links the Swift runtime in: --static-swift-stdlib):
#   - readelf: no shared Swift runtime library needed (libswiftCore.so, libdispatch.so,
#     libBlocksRuntime.so, libFoundation*.so, …) and no RUNPATH/RPATH into the toolchain;
#   - ldd: every library found, none of them from the toolchain;
#   - `BIN --version` runs and prints a version, with an empty environment and the toolchain
#     directory hidden from the loader (an empty tmpfs over it, in a private mount namespace).
#
# The toolchain is the directory above usr/bin/swift on PATH, or SWIFT_ROOT (default
# /opt/swift). Needs root, or unprivileged user namespaces, for the mount namespace.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: check-static.sh BIN..." >&2; exit 2; }

if [ -z "${SWIFT_ROOT:-}" ]; then
  if swift=$(command -v swift 2>/dev/null || command -v /opt/swift/usr/bin/swift); then
    # .../usr/bin/swift -> ...
    SWIFT_ROOT=$(dirname "$(dirname "$(dirname "$(readlink -f "$swift")")")")
  else
    SWIFT_ROOT=/opt/swift
  fi
fi
SWIFT_ROOT=${SWIFT_ROOT%/}

unshare_cmd=(unshare --mount --propagation private)
[ "$(id -u)" -eq 0 ] || unshare_cmd=(unshare --user --map-root-user --mount --propagation private)

failed=0
fail() { echo "check-static: $arg: $*" >&2; failed=1; }

for arg in "$@"; do
  [ -f "$arg" ] && [ -x "$arg" ] || { fail "not an executable"; continue; }
  bin=$(readlink -f "$arg")
  case "$bin" in "$SWIFT_ROOT"/*) fail "lies inside the toolchain ($SWIFT_ROOT)"; continue ;; esac
  dyn=$(readelf -d "$bin")
  # Swift's runtime libraries as shared objects (the static ones are linked in).
  swiftlibs=$(echo "$dyn" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' \
              | grep -E '^lib(swift|_?Foundation|dispatch|BlocksRuntime|_FoundationICU)' || true)
  [ -z "$swiftlibs" ] || fail "needs the shared Swift runtime: $(echo "$swiftlibs" | tr '\n' ' ')"
  paths=$(echo "$dyn" | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p')
  if echo "$paths" | tr ':' '\n' | grep -qE "^$SWIFT_ROOT(/|$)|/lib/swift(/|$)"; then
    fail "RUNPATH/RPATH into the toolchain: $paths"
  fi
  libs=$(ldd "$bin" 2>&1) || true
  if echo "$libs" | grep -q 'not found'; then
    fail "libraries not found: $(echo "$libs" | awk '/not found/ {print $1}' | tr '\n' ' ')"
  fi
  if echo "$libs" | grep -qF "$SWIFT_ROOT/"; then
    fail "loads libraries from the toolchain: $(echo "$libs" | grep -F "$SWIFT_ROOT/" | awk '{print $1}' | tr '\n' ' ')"
  fi
  # Run it with the toolchain's directory empty: an empty tmpfs mounted over it in a private
  # mount namespace (the host's mounts are untouched), and nothing in the environment.
  hide=""
  [ -d "$SWIFT_ROOT" ] && hide="mount -t tmpfs -o ro,size=4k tmpfs \"\$1\" && [ -z \"\$(ls -A \"\$1\")\" ] &&"
  if out=$("${unshare_cmd[@]}" sh -c "$hide exec env -i \"\$2\" --version" sh "$SWIFT_ROOT" "$bin" 2>&1) \
     && [ -n "$out" ]; then
    echo "check-static: $arg --version: $out (with $SWIFT_ROOT hidden, empty environment)"
  else
    fail "--version failed with $SWIFT_ROOT hidden: ${out:-no output}"
  fi
done
exit $failed
