"""The mqtap CLI end to end against the live daemon: every subcommand, --json parsed, errors
on stderr with the server's code, exit codes (0 ok, 1 API error, 3 unreachable, 64 usage)."""
import json
import os
import subprocess

import net
from conftest import unique_name
from mqtapd_client import ROOT

CLI = os.environ.get("MQTAP_BIN", os.path.join(ROOT, ".build", "debug", "mqtap"))


def mqtap(daemon, *args, tcp=False):
    where = ["--url", f"http://127.0.0.1:{daemon.port}", "--token-file", daemon.token_file] if tcp else ["--socket", daemon.socket]
    return subprocess.run([CLI, *args, *where], capture_output=True, text=True, timeout=30)


def js(daemon, *args, tcp=False):
    r = mqtap(daemon, *args, "--json", tcp=tcp)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_subcommand(daemon):
    n = unique_name("m")
    try:
        assert js(daemon, "ping")["status"] == "ok"
        assert mqtap(daemon, "ping").stdout.startswith("mqtapd ")
        d = js(daemon, "device", "create", n, "--queues", "3", "--mode", "echo", "--mtu", "1400", "--down", "--vnet-hdr")
        assert (d["queue_count"], d["mode"], d["mtu"], d["up"]) == (3, "echo", 1400, False)
        assert net.kernel_queue_count(n) == 3
        assert n in [x["name"] for x in js(daemon, "device", "list")["devices"]]
        table = mqtap(daemon, "device", "list").stdout
        assert table.splitlines()[0].split()[:3] == ["NAME", "TYPE", "QUEUES"] and n in table
        assert js(daemon, "device", "show", n, tcp=True)["name"] == n
        table = mqtap(daemon, "device", "list").stdout
        assert {"VNET", "PERSIST", "MAC"} <= set(table.splitlines()[0].split())
        d = js(daemon, "device", "set", n, "--up", "--max-queues", "8", "--mode", "sink")
        assert (d["up"], d["max_queues"], d["mode"]) == (True, 8, "sink")
        added = js(daemon, "queue", "add", n, "--count", "2")["queues"]
        assert [q["id"] for q in added] == [3, 4]
        assert js(daemon, "queue", "disable", n, "1")["enabled"] is False
        assert js(daemon, "queue", "enable", n, "1")["enabled"] is True
        assert js(daemon, "queue", "remove", n, "4") == {}
        assert [q["id"] for q in js(daemon, "queue", "list", n)["queues"]] == [0, 1, 2, 3]
        assert "ENABLED" in mqtap(daemon, "queue", "list", n).stdout
        s = js(daemon, "stats", n)
        assert set(s) == {"queues", "total", "kernel"}
        watch = mqtap(daemon, "stats", n, "--watch", "--count", "2", "--interval", "0.2")
        # Off a terminal: plain tables one after the other, no screen codes, every counter.
        assert watch.returncode == 0 and watch.stdout.count("RX_PPS") == 2 and "\x1b" not in watch.stdout
        header = [l for l in watch.stdout.splitlines() if l.startswith("QUEUE")][0].split()
        assert {"RX_BPS", "TX_BPS", "RX_ERRORS", "TX_ERRORS", "DROPPED"} <= set(header)
        kernel = [l for l in watch.stdout.splitlines() if l.startswith("kernel: ")][0]
        assert all(k in kernel for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors", "tx_bytes"))
        assert "rx: frames the daemon read" in watch.stdout
        assert js(daemon, "limits", "show")["kernel_max_queues"] == 256
        assert js(daemon, "limits", "set", "200")["max_queues"] == 200
        assert js(daemon, "limits", "set", "256")["max_queues"] == 256
        assert js(daemon, "device", "delete", n) == {}
        assert not net.exists(n)
    finally:
        net.delete_link(n)


def test_forward_declared_counts_and_events(daemon):
    a, b = unique_name("fa"), unique_name("fb")
    try:
        js(daemon, "device", "create", b, "--vnet-hdr", "--queues", "2")
        d = js(daemon, "device", "create", a, "--mode", "forward", "--peer", b, "--vnet-hdr", "--offload")
        assert (d["mode"], d["peer"], d["peer_state"], d["offload"]) == ("forward", b, "active", True)
        assert f"forward>{b}" in mqtap(daemon, "device", "list").stdout
        d = js(daemon, "device", "set", a, "--mode", "sink")
        assert d["mode"] == "sink" and "peer" not in d
        d = js(daemon, "device", "set", b, "--queues", "8", "--enabled-queues", "4")
        assert (d["queue_count"], d["enabled_queues"]) == (8, 4)
        r = mqtap(daemon, "device", "create", unique_name("fc"), "--mode", "forward", "--peer", "nope-x")
        assert r.returncode == 1 and "peer_unavailable" in r.stderr
        assert "DROPPED" in mqtap(daemon, "queue", "list", a).stdout
        for n in (a, b):
            assert js(daemon, "device", "delete", n) == {}
    finally:
        net.delete_link(a)
        net.delete_link(b)


def test_version_and_help():
    from conftest import BIN
    v = subprocess.run([CLI, "--version"], capture_output=True, text=True)
    d = subprocess.run([BIN, "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.strip() == d.stdout.strip() != ""
    h = subprocess.run([CLI, "device", "create", "--help"], capture_output=True, text=True).stdout
    for opt in ("--queues", "--max-queues", "--persist", "--vnet-hdr", "--mtu", "--mac", "--up", "--down", "--mode"):
        assert opt in h, opt
    assert "default" in h
    s = subprocess.run([CLI, "device", "set", "--help"], capture_output=True, text=True).stdout
    assert "--up" in s and "--down" in s and "enable-up" not in s


def test_errors_exit_nonzero_with_the_servers_code(daemon, tmpdir_short):
    r = mqtap(daemon, "device", "show", unique_name("z"))
    assert r.returncode == 1 and r.stderr.startswith("mqtap: not_found: ")
    r = mqtap(daemon, "device", "create", "bad name")
    assert r.returncode == 1 and "invalid_field" in r.stderr and "name" in r.stderr
    r = mqtap(daemon, "limits", "set", "0")
    assert r.returncode == 1 and "invalid_field" in r.stderr
    r = subprocess.run([CLI, "ping", "--socket", os.path.join(tmpdir_short, "nothing.sock")], capture_output=True, text=True)
    assert r.returncode == 3 and "cannot reach mqtapd" in r.stderr
    r = subprocess.run([CLI, "device", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 64
    r = subprocess.run([CLI, "ping", "--url", "ftp://x"], capture_output=True, text=True)
    assert r.returncode == 64 and "--url" in r.stderr


def test_names_never_reach_another_resource(daemon, api):
    """A name is a path segment: one that could never be a device is refused before any
    request, and nothing in it adds a query or a path (`x?force=true` must not force-delete a
    leased device, `x/queues/1` must not remove a queue)."""
    import lease_client
    n = unique_name("e")
    try:
        assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
        lease = lease_client.take(daemon.socket, n, {"queues": [0]})
        try:
            for bad in (f"{n}?force=true", f"{n}/queues/1", f"{n}#x", "../v1/limits", f"{n}%3Fforce=true"):
                for args in (("device", "delete", bad), ("device", "show", bad), ("queue", "remove", bad, "1"),
                             ("lease", "list", bad)):
                    r = mqtap(daemon, *args)
                    assert r.returncode == 64 and "is not a device name" in r.stderr, (args, r.returncode, r.stderr)
            d = api.get(f"/v1/devices/{n}").json()
            assert d["queue_count"] == 2 and d["queues"][0]["leased"], "nothing was removed or revoked"
            # A valid name still works, and a lease id is a segment too.
            r = mqtap(daemon, "lease", "revoke", n, "nope?x=1")
            assert r.returncode == 1 and "not_found" in r.stderr, r.stderr
        finally:
            lease.close()
        assert mqtap(daemon, "device", "delete", n).returncode == 0
    finally:
        net.delete_link(n)
