"""Leases on real taps: a client takes queue fds over the Unix socket (recvmsg), the daemon
keeps away from them while the lease lasts and takes them back when it ends."""
import os
import subprocess

import lease_client
import net
import rawhttp
from conftest import MQTAP_BIN, Daemon, unique_name


def mac_of(api, n):
    return api.get(f"/v1/devices/{n}").json()["mac"]


def queues(api, n):
    return api.get(f"/v1/devices/{n}").json()["queues"]


def test_the_fds_are_the_devices_queues(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 4}).status == 201
    lease = lease_client.take(daemon.socket, n, {"holder": "pytest"})
    try:
        assert isinstance(lease, lease_client.Lease), lease
        assert [q["id"] for q in lease.line["queues"]] == [0, 1, 2, 3] and lease.line["device"] == n
        for fd in lease.fds:
            ifname, flags = lease_client.getiff(fd)
            assert ifname == n and flags & net.IFF_MULTI_QUEUE
        qs = queues(api, n)
        assert all(q["leased"] and q["lease"] == lease.id and q["lease_state"] == "live" for q in qs)
        leases = api.get(f"/v1/devices/{n}/leases").json()["leases"]
        assert [l["id"] for l in leases] == [lease.id]
        assert leases[0]["holder"] == "pytest" and leases[0]["pid"] == os.getpid() and leases[0]["uid"] == os.getuid()
        assert net.kernel_queue_count(n) == 4, "the holder's fds are the daemon's queues, not new ones"
    finally:
        lease.close()
    assert net.settle(lambda: not any(q["leased"] for q in queues(api, n)))
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_frames_go_to_the_holder_then_back_to_the_daemon(daemon, api, name):
    """Exact over the whole sequence: what the holder read plus what the daemon counted is
    what the kernel transmitted into the device."""
    n = name()
    # Down until the kernel's own IPv6 packets are off, so only the test's frames go through.
    assert api.post("/v1/devices", {"name": n, "queues": 2, "up": False}).status == 201
    net.disable_ipv6(n)
    assert api.patch(f"/v1/devices/{n}", {"up": True}).status == 200
    mac = mac_of(api, n)
    total = lambda: api.get(f"/v1/devices/{n}/stats").json()["total"]["rx_packets"]
    before = total()
    start = net.kernel_stats(n)
    lease = lease_client.take(daemon.socket, n)
    sent = net.send_frames(n, mac, 400)
    held = lease_client.drain(lease.fds)
    assert total() == before, "a leased queue is the holder's: the daemon does not read it"
    assert held > 0
    lease.close()
    assert net.settle(lambda: not any(q["leased"] for q in queues(api, n)))
    sent += net.send_frames(n, mac, 300)
    kernel = lambda: net.kernel_stats(n)["tx_packets"] - start["tx_packets"]
    assert net.settle(lambda: held + total() - before == kernel()), (held, total(), before, kernel(), sent)
    assert total() > before, "taken back, the queues are read and counted by the daemon again"
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_holders_detach_shows_and_release_puts_it_back(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 3}).status == 201
    assert api.patch(f"/v1/devices/{n}/queues/2", {"enabled": False}).status == 200
    lease = lease_client.take(daemon.socket, n, {"queues": [0, 1]})
    assert [q["enabled"] for q in lease.line["queues"]] == [True, True]
    # As QEMU does for queue pairs its guest does not use.
    lease_client.set_queue(lease.fds[1], False)
    assert net.settle(lambda: [q["enabled"] for q in queues(api, n)] == [True, False, False], timeout=1.0)
    assert api.get(f"/v1/devices/{n}/queues/1").json()["enabled"] is False
    # The API still attaches and detaches a leased queue (the daemon's fd is the same queue).
    assert api.patch(f"/v1/devices/{n}/queues/0", {"enabled": False}).json()["enabled"] is False
    assert api.patch(f"/v1/devices/{n}/queues/0", {"enabled": True}).json()["enabled"] is True
    lease.close()
    # Back to what the API last set: 0 and 1 attached, 2 detached.
    assert net.settle(lambda: [(q["enabled"], q["leased"]) for q in queues(api, n)]
                      == [(True, False), (True, False), (False, False)])
    out = subprocess.run(["ip", "-d", "link", "show", n], capture_output=True, text=True).stdout.split()
    assert out[out.index("numdisabled") + 1] == "1"
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_refusals_change_nothing(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
    # Without the Upgrade headers: 426 saying what to send.
    r = api.post(f"/v1/devices/{n}/leases", {})
    assert r.status == 426 and r.code == "upgrade_required" and r.headers.get("upgrade") == "mqtapd-lease/1", r
    r = daemon.tcp.post(f"/v1/devices/{n}/leases", {}, headers={"Connection": "Upgrade", "Upgrade": "mqtapd-lease/1"})
    assert r.status == 400 and r.code == "unix_socket_required", r
    r = lease_client.take(daemon.socket, name())
    assert r.status == 404 and r.code == "not_found", r
    r = lease_client.take(daemon.socket, n, {"queues": [5]})
    assert r.status == 404 and r.json()["error"]["field"] == "queues" and "5" in r.json()["error"]["message"], r
    r = lease_client.take(daemon.socket, n, {"queues": [0], "holder": "x" * 129})
    assert r.status == 400 and r.json()["error"]["field"] == "holder", r
    r = lease_client.take(daemon.socket, n, {"queues": "all"})
    assert r.status == 400 and r.json()["error"]["field"] == "queues", r
    assert not any(q["leased"] for q in queues(api, n))
    lease = lease_client.take(daemon.socket, n, {"queues": [1]})
    try:
        r = lease_client.take(daemon.socket, n, {"queues": [0, 1]})
        assert r.status == 409 and r.code == "queue_leased", r
        assert not queues(api, n)[0]["leased"]
        r = api.delete(f"/v1/devices/{n}/queues/1")
        assert r.status == 409 and r.code == "queue_leased", r
        r = api.delete(f"/v1/devices/{n}")
        assert r.status == 409 and r.code == "device_leased", r
        assert net.exists(n)
    finally:
        lease.close()
    assert net.settle(lambda: not any(q["leased"] for q in queues(api, n)))
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_revoke_detaches_closes_and_forgets(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
    lease = lease_client.take(daemon.socket, n, {"queues": [1]})
    assert api.delete(f"/v1/devices/{n}/leases/{lease.id}").status == 204
    lease.sock.settimeout(5)
    assert lease.sock.recv(1) == b"", "the lease's connection is closed"
    _, flags = lease_client.getiff(lease.fds[0])
    assert flags & net.IFF_DETACH_QUEUE, "the holder's queue is detached"
    # The id has a fresh file, the daemon's alone, attached as the API had it; the old one
    # is kept detached.
    q = api.get(f"/v1/devices/{n}/queues/1").json()
    assert q["enabled"] is True and q["leased"] is False
    d = api.get(f"/v1/devices/{n}").json()
    assert d["revoked_queues"] == 1 and d["queue_count"] == 2 and d["consumer"] == "daemon"
    assert net.kernel_queue_count(n) == 2, "attached: queue 0 and the fresh file of 1; the revoked one is detached"
    assert api.get(f"/v1/devices/{n}/leases").json()["leases"] == []
    assert api.delete(f"/v1/devices/{n}/leases/{lease.id}").status == 404
    lease.close()
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_force_delete_revokes_and_deletes_the_link(daemon, api, name):
    n = name()
    fds = net.open_fds(daemon.pid)
    assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
    lease = lease_client.take(daemon.socket, n)
    try:
        assert api.delete(f"/v1/devices/{n}?force=true").status == 204
        assert not net.exists(n), "the link is gone although the holder still has fds"
        lease.sock.settimeout(5)
        assert lease.sock.recv(1) == b""
        assert api.get(f"/v1/devices/{n}").status == 404
    finally:
        lease.close()
    assert net.settle(lambda: net.open_fds(daemon.pid) <= fds)


def test_cli_lease_runs_a_command_with_the_fds(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 3}).status == 201
    # The command sees the fds (as {fds} and in the environment) and the lease is live while it runs.
    script = ('for fd in $(echo "$0" | tr : " "); do test -e /proc/self/fd/$fd || exit 9; done; '
              'test "$0" = "$MQTAP_QUEUE_FDS" || exit 8; echo "$MQTAP_LEASE"; read _')
    p = subprocess.Popen([MQTAP_BIN, "lease", n, "--socket", daemon.socket, "--queues", "0,2", "--holder", "cli",
                          "--", "sh", "-c", script, "{fds}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # The command lives until the test has seen its lease (it waits for a line on stdin).
        assert net.settle(lambda: [q["leased"] for q in queues(api, n)] == [True, False, True])
        lease = api.get(f"/v1/devices/{n}/leases").json()["leases"][0]
        assert lease["holder"] == "cli" and lease["queues"] == [0, 2]
        out, err = p.communicate(input="\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert out.strip() == lease["id"]
    # The command exited: its connection closed, the lease ended.
    assert net.settle(lambda: not any(q["leased"] for q in queues(api, n)))
    r = subprocess.run([MQTAP_BIN, "lease", "list", n, "--socket", daemon.socket], capture_output=True, text=True)
    assert r.returncode == 0 and "ID" in r.stdout
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_1100_live_leases_leave_the_api_answering(tmpdir_short):
    """Lease connections have slots of their own: with 1100 live (over --max-leases 1100),
    health, revoke and a forced delete answer, a new lease past the limit is 409
    lease_limit, and the API's own connections are all there."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    d = Daemon(tmpdir_short, "--max-leases", "1100", tcp=False)
    devs = [unique_name("m") for _ in range(5)]
    leases = []
    try:
        api = d.unix
        for n in devs:
            assert api.post("/v1/devices", {"name": n, "queues": 221, "up": False}).status == 201
        for n in devs:
            for q in range(220):
                lease = lease_client.take(d.socket, n, {"queues": [q]})
                assert isinstance(lease, lease_client.Lease), (n, q, lease)
                leases.append(lease)
        assert len(leases) == 1100
        r = lease_client.take(d.socket, devs[0], {"queues": [220]})
        assert not isinstance(r, lease_client.Lease) and r.status == 409 and r.code == "lease_limit", r
        # The API's connections are its own: 100 at once all get in and are answered.
        held = [rawhttp.connect(d.socket, timeout=10) for _ in range(100)]
        for s in held:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in held:
            assert s.recv(64).startswith(b"HTTP/1.1 200"), "a health check got no answer"
            s.close()
        assert api.delete(f"/v1/devices/{devs[0]}/leases/{leases[0].id}").status == 204
        assert api.delete(f"/v1/devices/{devs[1]}?force=true").status == 204
        assert not net.exists(devs[1])
        lease = lease_client.take(d.socket, devs[0], {"queues": [220]})
        assert isinstance(lease, lease_client.Lease), lease
        leases.append(lease)
    finally:
        for lease in leases:
            lease.close()
        assert d.stop() == 0
        for n in devs:
            net.delete_link(n)
