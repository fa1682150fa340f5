#!/usr/bin/env bash
# Builds the Dockerfile's runtime stage without a Docker engine and checks that the daemon in
# it answers /v1/health:
#   - the base image (debian:bookworm-slim) is made with debootstrap (Debian's archive) and
#     imported into buildah's local storage once; later runs reuse it (cached);
#   - the Swift build stage needs the swift image, which cannot be pulled here, so the
#     binaries are built on the host exactly as that stage builds them (release, static
#     Swift runtime) and the runtime stage's own instructions are built with buildah, with
#     its COPY --from=build taking them from the context instead;
#   - the image runs with buildah run (host network, CAP_NET_ADMIN, /dev/net/tun).
set -euo pipefail
cd "$(dirname "$0")/.."
export STORAGE_DRIVER=vfs
CACHE=/var/cache/mqtapd
BASE=docker.io/library/debian:bookworm-slim
IMAGE=localhost/mqtapd:ci

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "container-test: $tool is missing (make deps installs it)" >&2; exit 1; }
done

if ! buildah images --quiet "$BASE" >/dev/null 2>&1 || [ -z "$(buildah images --quiet "$BASE" 2>/dev/null)" ]; then
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/bookworm-minbase.tar" ]; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log"
    tar -C "$CACHE/rootfs" -cf "$CACHE/bookworm-minbase.tar" .
    rm -rf "$CACHE/rootfs"
  fi
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$CACHE/bookworm-minbase.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

# The build stage's product, built on the host the way the Dockerfile builds it.
# Quiet unless it fails: then its output says why.
# (SwiftPM's own temporary directories stay in the scratch path, not in /tmp.)
mkdir -p .build-static/tmp
for product in mqtapd mqtap; do
  if ! out=$(TMPDIR="$PWD/.build-static/tmp" swift build -c release --static-swift-stdlib --scratch-path .build-static --product "$product" 2>&1); then
    echo "container-test: the static build of $product failed:" >&2
    echo "$out" | tail -40 >&2
    exit 1
  fi
done

ctx=$(mktemp -d)
ctr=""
pid=""
cleanup() {
  local status=$?
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$ctr" ]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
  rm -rf "$ctx"
  # Each build leaves the previous image untagged; keep only the base and the last build.
  buildah rmi --prune >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT
mkdir -p "$ctx/bin"
cp .build-static/release/mqtapd .build-static/release/mqtap "$ctx/bin/"
# The runtime stage, verbatim but for where COPY --from=build takes the binaries.
awk -v from="FROM $BASE" '$0 == from { on = 1 } on' Dockerfile \
  | sed 's|^COPY --from=build /usr/local/bin/mqtapd /usr/local/bin/mqtap /usr/local/bin/|COPY bin/mqtapd bin/mqtap /usr/local/bin/|' \
  > "$ctx/Containerfile"
grep -q '^COPY bin/mqtapd bin/mqtap /usr/local/bin/' "$ctx/Containerfile" \
  || { echo "container-test: the Dockerfile's runtime stage changed; update this script" >&2; exit 1; }
grep -qxF "FROM $BASE" "$ctx/Containerfile" \
  || { echo "container-test: no runtime stage FROM $BASE in the Dockerfile" >&2; exit 1; }

buildah bud --quiet --pull-never --isolation chroot --network host -t "$IMAGE" -f "$ctx/Containerfile" "$ctx" >"$ctx/build.log" 2>&1 \
  || { cat "$ctx/build.log" >&2; exit 1; }
echo "container-test: built $IMAGE from the Dockerfile's runtime stage"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ctr=$(buildah from "$IMAGE")
# chroot isolation: this machine's cgroup layout rules out crun's namespaces; the daemon still
# runs from the image's own root, libraries and all, with the host's /dev/net/tun mounted.
# TCP needs a token (a file only its owner reads), made inside the container.
token="ct-$$-$RANDOM$RANDOM"
auth="Authorization: Bearer $token"
buildah run --isolation chroot --network host --cap-add CAP_NET_ADMIN --volume /dev/net/tun:/dev/net/tun "$ctr" -- \
  sh -c "umask 077 && echo $token > /tmp/token && exec /usr/local/bin/mqtapd --listen tcp:127.0.0.1:$port --token-file /tmp/token --state-dir /var/lib/mqtapd" \
  >"$ctx/log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if out=$(curl -fsS -H "$auth" "http://127.0.0.1:$port/v1/health" 2>/dev/null); then break; fi
  sleep 0.1
done
echo "container-test: /v1/health answered: ${out:-nothing}"
[[ "${out:-}" == *'"status":"ok"'* ]] || { cat "$ctx/log" >&2; exit 1; }
# The CLI in the image works too (what the Kubernetes probe runs).
buildah run --isolation chroot --network host "$ctr" -- /usr/local/bin/mqtap ping --url "http://127.0.0.1:$port" \
  --token-file /tmp/token | grep -q "ok"
echo "container-test: mqtap ping inside the image: ok"
# And it manages a real device from inside the image.
name="mqct$$"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -H "$auth" \
  -d "{\"name\":\"$name\",\"queues\":2}" "http://127.0.0.1:$port/v1/devices")
[ "$code" = 201 ] || { echo "container-test: create in the image answered $code" >&2; cat "$ctx/log" >&2; exit 1; }
curl -fsS -H "$auth" -X DELETE "http://127.0.0.1:$port/v1/devices/$name" >/dev/null
echo "container-test: a 2-queue device made and deleted from inside the image"
