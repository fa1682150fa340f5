"""The mqtap CLI end to end against the live daemon: every subcommand, --json parsed, errors
on stderr with the server's code, exit codes (0 ok, 1 API error, 3 unreachable, 64 usage)."""
import json
import os
import subprocess

import net
from conftest import BIN, MQTAP_BIN, unique_name


def mqtap(daemon, *args, tcp=False):
    where = ["--url", f"http://127.0.0.1:{daemon.port}", "--token-file", daemon.token_file] if tcp else ["--socket", daemon.socket]
    return subprocess.run([MQTAP_BIN, *args, *where], capture_output=True, text=True, timeout=30)


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
        table = mqtap(daemon, "stats", n).stdout
        kernel = [l for l in table.splitlines() if l.startswith("kernel: ")][0]
        assert all(k in kernel for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors", "tx_bytes"))
        watch = mqtap(daemon, "stats", n, "--watch", "--count", "3", "--interval", "0.2")
        # Off a terminal, as vmstat -t: the legend and header once, then one line per queue and
        # the total per sample, each starting with its time; no screen codes.
        lines = watch.stdout.splitlines()
        assert watch.returncode == 0 and "\x1b" not in watch.stdout, watch.stderr
        assert lines[0].startswith("rx: frames the daemon read") and watch.stdout.count("rx: frames") == 1
        header = lines[1].split()
        assert header[:2] == ["TIME", "QUEUE"] and watch.stdout.count("RX_PPS") == 1
        assert {"RX_BPS", "TX_BPS", "RX_ERRORS", "TX_ERRORS", "DROPPED"} <= set(header)
        samples = [l.split() for l in lines[2:]]
        assert len(samples) == 3 * 5, lines  # 4 queues and the total, 3 times
        assert all(s[0].endswith("Z") and "T" in s[0] for s in samples)
        assert [s[1] for s in samples[:5]] == ["0", "1", "2", "3", "total"]
        assert len({s[0] for s in samples}) >= 2, "each sample has its own time"
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
    v = subprocess.run([MQTAP_BIN, "--version"], capture_output=True, text=True)
    d = subprocess.run([BIN, "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.strip() == d.stdout.strip() != ""
    h = subprocess.run([MQTAP_BIN, "device", "create", "--help"], capture_output=True, text=True).stdout
    for opt in ("--queues", "--max-queues", "--persist", "--vnet-hdr", "--mtu", "--mac", "--up", "--down", "--mode"):
        assert opt in h, opt
    assert "default" in h
    s = subprocess.run([MQTAP_BIN, "device", "set", "--help"], capture_output=True, text=True).stdout
    assert "--up" in s and "--down" in s and "enable-up" not in s


def test_errors_exit_nonzero_with_the_servers_code(daemon, tmpdir_short):
    r = mqtap(daemon, "device", "show", unique_name("z"))
    assert r.returncode == 1 and r.stderr.startswith("mqtap: not_found: ")
    r = mqtap(daemon, "device", "create", "bad name")
    assert r.returncode == 1 and "invalid_field" in r.stderr and "name" in r.stderr
    r = mqtap(daemon, "limits", "set", "0")
    assert r.returncode == 1 and "invalid_field" in r.stderr
    r = subprocess.run([MQTAP_BIN, "ping", "--socket", os.path.join(tmpdir_short, "nothing.sock")], capture_output=True, text=True)
    assert r.returncode == 3 and "cannot reach mqtapd" in r.stderr
    r = subprocess.run([MQTAP_BIN, "device", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 64
    r = subprocess.run([MQTAP_BIN, "ping", "--url", "ftp://x"], capture_output=True, text=True)
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


def test_global_options_before_the_subcommand_and_exit_codes(daemon, api):
    """`mqtap --socket S ping` as docker/kubectl/virsh users type it; exit codes as the README
    says: 0, 1 for an API error, 3 only when the daemon cannot be reached, 64 for usage."""
    n = unique_name("g")
    try:
        r = subprocess.run([MQTAP_BIN, "--socket", daemon.socket, "ping"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("mqtapd "), r.stderr
        r = subprocess.run([MQTAP_BIN, "--url", f"http://127.0.0.1:{daemon.port}", "--token-file", daemon.token_file, "--json",
                            "device", "create", n, "--queues", "2"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and json.loads(r.stdout)["queue_count"] == 2, r.stderr
        r = subprocess.run([MQTAP_BIN, f"--socket={daemon.socket}", "device", "show", n], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and n in r.stdout, r.stderr
        # Options after the subcommand still work, and a lease's `--` is untouched.
        assert mqtap(daemon, "ping").returncode == 0
        r = subprocess.run([MQTAP_BIN, "--socket", daemon.socket, "lease", n, "--", "true"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        # A lease over TCP is a usage error (fds cannot cross TCP), not "unreachable".
        r = subprocess.run([MQTAP_BIN, "--url", f"http://127.0.0.1:{daemon.port}", "--token-file", daemon.token_file,
                            "lease", n, "--", "true"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 64 and "--socket" in r.stderr, (r.returncode, r.stderr)
        # An API error is 1; no daemon is 3.
        assert mqtap(daemon, "device", "show", "nosuch0").returncode == 1
        r = subprocess.run([MQTAP_BIN, "--socket", "/nonexistent/api.sock", "ping"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 3, r.stderr
        assert api.delete(f"/v1/devices/{n}").status == 204
    finally:
        net.delete_link(n)


def test_events_exit_non_zero_when_the_daemon_goes(tmpdir_short):
    """`mqtap events` following a daemon that stops says so on stderr and exits 3."""
    from conftest import Daemon
    d = Daemon(tmpdir_short, tcp=False)
    p = subprocess.Popen([MQTAP_BIN, "--socket", d.socket, "events", "--since", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        n = unique_name("ev")
        # The watcher is in once an event it follows shows up.
        assert d.unix.post("/v1/devices", {"name": n}).status == 201
        assert "device.created" in p.stdout.readline()
        assert d.stop() == 0
        rc = p.wait(timeout=30)
        err = p.stderr.read()
        assert rc == 3 and "went away" in err, (rc, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
