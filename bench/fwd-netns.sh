#!/bin/bash
# fwd-netns.sh: TCP throughput through a forwarder between two taps (bench/fwd, or mqtapd's
# forward mode), each tap in its own network namespace so that the kernel cannot route around
# the forwarder: ns ${PREFIX}a holds tap A (198.18.0.1/24), ns ${PREFIX}b tap B (198.18.0.2/24).
#
#   fwd-netns.sh setup PREFIX                   namespaces ${PREFIX}a and ${PREFIX}b
#   fwd-netns.sh attach PREFIX DEVA DEVB        move the forwarder's taps in, address them, up
#   fwd-netns.sh iperf PREFIX SECONDS STREAMS   iperf3 a -> b; prints "<Gbit/s> Gbit/s ..."
#   fwd-netns.sh teardown PREFIX                delete both namespaces and all in them
#   fwd-netns.sh veth PREFIX SECONDS STREAMS    the same iperf3 over the kernel's own veth pair
#                                               (setup, measure, teardown): the upper reference
#
# A run: start the forwarder (it makes the taps and prints "ready"), then setup, attach,
# iperf, stop the forwarder, teardown. Deleting a namespace deletes the taps in it even while
# the forwarder holds their fds (its reads then fail with EFAULT).
# Set IPERF_JSON=FILE to keep iperf3's JSON report. Needs root, iproute2, iperf3, python3.
set -euo pipefail

ADDR_A=198.18.0.1
ADDR_B=198.18.0.2
PORT=5201

die() { echo "fwd-netns.sh: $*" >&2; exit 1; }
usage() { sed -n '6,11s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# The address, link up and no IPv6 (no router solicitations or DAD in the measurement).
configure() {  # NS DEV ADDR
    ip netns exec "$1" sysctl -qw "net.ipv6.conf.$2.disable_ipv6=1"
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
}

exists() { [ -e "/var/run/netns/${P}a" ] || [ -e "/var/run/netns/${P}b" ]; }
need_ns() {
    [ -e "/var/run/netns/${P}a" ] && [ -e "/var/run/netns/${P}b" ] || die "no ${P}a/${P}b (setup?)"
}

do_setup() {
    ip netns add "${P}a"
    ip netns add "${P}b"
    ip -n "${P}a" link set lo up
    ip -n "${P}b" link set lo up
}

do_teardown() {
    local ns
    for ns in "${P}a" "${P}b"; do
        [ -e "/var/run/netns/$ns" ] || continue
        # Whatever this script started in there (an iperf3 left by an interrupted run).
        ip netns pids "$ns" | xargs -r kill 2>/dev/null || true
        ip netns del "$ns"
    done
}

do_attach() {
    local deva=$1 devb=$2
    # Moving a device takes it down and drops its addresses; its open fds keep working.
    ip link set "$deva" netns "${P}a"
    ip link set "$devb" netns "${P}b"
    configure "${P}a" "$deva" "$ADDR_A"
    configure "${P}b" "$devb" "$ADDR_B"
    # Wait until a reaches b through the forwarder (ARP, then a TCP connect that b refuses:
    # there may be no ping).
    ip netns exec "${P}a" python3 - "$ADDR_B" <<'EOF' ||
import socket, sys, time
for _ in range(50):
    try:
        socket.create_connection((sys.argv[1], 9), timeout=0.2).close()
        sys.exit(0)
    except ConnectionRefusedError:
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
        die "$ADDR_B not reachable from ${P}a through $deva/$devb"
}

SERVER_PID=
JSON=
cleanup_iperf() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$JSON" ]; then rm -f "$JSON"; fi
}

do_iperf() {
    local seconds=$1 streams=$2 i
    JSON=$(mktemp "/tmp/${P}-iperf.XXXXXX")
    ip netns exec "${P}b" iperf3 -s -1 -B "$ADDR_B" -p "$PORT" >/dev/null 2>&1 &
    SERVER_PID=$!
    for i in $(seq 50); do
        [ -n "$(ip netns exec "${P}b" ss -Hltn "sport = :$PORT" 2>/dev/null)" ] && break
        sleep 0.1
    done
    ip netns exec "${P}a" iperf3 -c "$ADDR_B" -p "$PORT" -t "$seconds" -P "$streams" -J >"$JSON" ||
        die "iperf3 client failed: $(head -c 400 "$JSON")"
    wait "$SERVER_PID" || true
    SERVER_PID=
    if [ -n "${IPERF_JSON:-}" ]; then cp "$JSON" "$IPERF_JSON"; fi
    python3 - "$JSON" <<'EOF'
import json, sys
end = json.load(open(sys.argv[1]))["end"]
print("%.3f Gbit/s received, %d retransmits" % (end["sum_received"]["bits_per_second"] / 1e9,
                                                 end["sum_sent"].get("retransmits", 0)))
EOF
}

do_veth() {
    do_setup
    ip link add "${P}va" netns "${P}a" type veth peer name "${P}vb" netns "${P}b"
    configure "${P}a" "${P}va" "$ADDR_A"
    configure "${P}b" "${P}vb" "$ADDR_B"
    do_iperf "$@"
}

[ $# -ge 2 ] || usage
cmd=$1 P=$2
shift 2
[ -n "$P" ] && [ ${#P} -le 8 ] || die "PREFIX must be 1..8 characters (device names are ${P}va)"

# A signal ends the script through its EXIT trap.
trap 'exit 130' INT TERM
# On failure, undo what the command made.
on_failure() { trap "rc=\$?; [ \$rc -eq 0 ] || { $1; }; exit \$rc" EXIT; }

case "$cmd" in
setup)
    [ $# -eq 0 ] || usage
    ! exists || die "${P}a or ${P}b exists already (teardown $P?)"
    on_failure do_teardown
    do_setup ;;
attach)
    [ $# -eq 2 ] || usage
    # A half-attached pair is of no use: take the namespaces (and the taps in them) down.
    need_ns
    on_failure do_teardown
    do_attach "$@" ;;
iperf)
    [ $# -eq 2 ] || usage
    need_ns
    trap 'cleanup_iperf' EXIT
    do_iperf "$@" ;;
teardown)
    [ $# -eq 0 ] || usage
    do_teardown ;;
veth)
    [ $# -eq 2 ] || usage
    ! exists || die "${P}a or ${P}b exists already (teardown $P?)"
    trap 'cleanup_iperf; do_teardown' EXIT
    do_veth "$@" ;;
*) usage ;;
esac
