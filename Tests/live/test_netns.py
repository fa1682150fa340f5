"""Devices where their consumers live (issue 21): made inside a network namespace (by
/run/netns path, by bare name, by /proc/PID/ns/net), counted exactly there, found again there
after a restart (never re-made on the host), and single-queue devices."""
import json
import os
import signal
import subprocess

import net
from conftest import MQTAP_BIN, Daemon, unique_name

LIVE = os.path.dirname(os.path.abspath(__file__))


def netns_add(name):
    subprocess.run(["ip", "netns", "add", name], check=True)


def netns_del(name):
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_ns(ns, *cmd, check=True):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check)


def exists_in(ns, ifname):
    return in_ns(ns, "ip", "link", "show", "dev", ifname, check=False).returncode == 0


def send_in(ns, ifname, mac, count):
    """AF_PACKET frames sent on the device from inside its namespace (net.send_frames)."""
    code = f"import net; print(net.send_frames({ifname!r}, {mac!r}, {count}))"
    return int(in_ns(ns, "python3", "-c", code).stdout)


def test_create_in_a_namespace_by_path_name_and_proc(api, name):
    ns = unique_name("ns")
    ifname = unique_name("t")
    host_tap = ifname  # the same name on the host is no conflict inside
    netns_add(ns)
    holder = None
    try:
        subprocess.run(["ip", "tuntap", "add", "dev", host_tap, "mode", "tap"], check=True)
        a = name()
        r = api.post("/v1/devices", {"name": a, "ifname": ifname, "netns": f"/run/netns/{ns}", "queues": 4, "up": False})
        assert r.status == 201, r
        d = r.json()
        assert d["kernel_name"] == ifname and d["netns"]["own"] is False and d["netns"]["name"] == ns
        assert d["netns_home"]["path"] == f"/run/netns/{ns}" and d["netns_home"]["inode"] == d["netns"]["inode"]
        assert exists_in(ns, ifname) and net.exists(host_tap)
        assert "multi_queue" in in_ns(ns, "ip", "-d", "link", "show", "dev", ifname).stdout
        # The name is taken inside now: 409, by bare name too.
        r = api.post("/v1/devices", {"name": name(), "ifname": ifname, "netns": ns})
        assert r.status == 409 and r.code == "name_conflict", r
        in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")
        assert api.patch(f"/v1/devices/{a}", {"up": True, "mtu": 1400}).status == 200
        assert "mtu 1400" in in_ns(ns, "ip", "link", "show", "dev", ifname).stdout
        t0 = api.get(f"/v1/devices/{a}/stats").json()
        k0 = net.kernel_stats(ifname, ns)["tx_packets"]
        sent = send_in(ns, ifname, d["mac"], 300)
        assert sent == 300
        ok = net.settle(lambda: api.get(f"/v1/devices/{a}/stats").json()["total"]["rx_packets"] - t0["total"]["rx_packets"]
                        == net.kernel_stats(ifname, ns)["tx_packets"] - k0 == 300, 10)
        assert ok, (api.get(f"/v1/devices/{a}/stats").json(), net.kernel_stats(ifname, ns)["tx_packets"], k0)
        s = api.get(f"/v1/devices/{a}/stats").json()
        assert s["kernel"]["tx_packets"] == net.kernel_stats(ifname, ns)["tx_packets"], "the kernel counters are the namespace's device's"
        assert api.post(f"/v1/devices/{a}/queues").status == 201
        assert api.delete(f"/v1/devices/{a}").status == 204
        assert not exists_in(ns, ifname) and net.exists(host_tap), "only the namespace's device went"

        # By /proc/PID/ns/net of a process the test started.
        holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
        proc_ns = f"/proc/{holder.pid}/ns/net"
        assert net.settle(lambda: os.readlink(proc_ns) != os.readlink("/proc/self/ns/net"), 10)
        b = name()
        r = api.post("/v1/devices", {"name": b, "ifname": "tap0", "netns": proc_ns, "queues": 2})
        assert r.status == 201 and r.json()["netns"]["own"] is False, r
        out = subprocess.run(["nsenter", f"--net={proc_ns}", "ip", "-o", "link", "show", "dev", "tap0"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "tap0" in out.stdout
        assert api.delete(f"/v1/devices/{b}").status == 204
    finally:
        if holder:
            holder.kill()
            holder.wait()
        netns_del(ns)
        net.delete_link(host_tap)


def test_refusals_for_a_namespace(api, name, tmpdir_short):
    r = api.post("/v1/devices", {"name": name(), "netns": "/run/netns/no-such-ns-x"})
    assert r.status == 404 and r.code == "not_found" and r.json()["error"]["field"] == "netns", r
    plain = os.path.join(tmpdir_short, "plain")
    open(plain, "w").close()
    for bad in (plain, "/proc/self/ns/uts", tmpdir_short):
        r = api.post("/v1/devices", {"name": name(), "netns": bad})
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "netns", (bad, r)
    r = api.post("/v1/devices", {"name": name(), "ifname": "bad name"})
    assert r.status == 400 and r.json()["error"]["field"] == "ifname", r


def test_restarts_keep_the_namespace(tmpdir_short):
    """Persistent and non-persistent devices in a namespace come back there after a crash;
    one whose namespace is gone is kept (netns_gone), never made on the host."""
    ns, gone = unique_name("nr"), unique_name("ng")
    p, t, g = unique_name("p"), unique_name("q"), unique_name("g")
    netns_add(ns)
    netns_add(gone)
    d = Daemon(tmpdir_short, tcp=False)
    try:
        api = d.unix
        assert api.post("/v1/devices", {"name": p, "netns": ns, "queues": 2, "persist": True}).status == 201
        assert api.post("/v1/devices", {"name": t, "netns": ns, "queues": 3}).status == 201
        assert api.post("/v1/devices", {"name": g, "netns": gone, "queues": 1}).status == 201
        inode = api.get(f"/v1/devices/{p}").json()["netns"]["inode"]
        d.stop(signal.SIGKILL)
        # The non-persistent ones died with the process; the namespace `gone` goes too.
        assert exists_in(ns, p) and not exists_in(ns, t)
        netns_del(gone)
        d = Daemon(tmpdir_short, tcp=False)
        api = d.unix
        for n, q in ((p, 2), (t, 3)):
            dev = api.get(f"/v1/devices/{n}").json()
            assert dev["state"] == "active" and dev["queue_count"] == q, dev
            assert dev["netns"]["inode"] == inode and dev["netns"]["own"] is False
            assert exists_in(ns, n) and not net.exists(n), "back in its namespace, not on the host"
        dev = api.get(f"/v1/devices/{g}").json()
        assert dev["state"] == "kept" and dev["state_reason"].startswith("netns_gone"), dev
        assert not net.exists(g), "never made on the host"
        assert any("network namespace is gone" in line and g in line for line in d.log)
        # A namespace made anew at the same path is not the old one: still kept.
        netns_add(gone)
        assert d.stop() == 0
        d = Daemon(tmpdir_short, tcp=False)
        api = d.unix
        assert api.get(f"/v1/devices/{g}").json()["state"] == "kept"
        assert not exists_in(gone, g)
        for n in (p, t, g):
            assert api.delete(f"/v1/devices/{n}").status == 204
        assert not exists_in(ns, p) and not exists_in(ns, t)
    finally:
        d.stop()
        netns_del(ns)
        netns_del(gone)


def test_a_device_moved_by_hand_comes_back_where_it_went(tmpdir_short):
    ns = unique_name("nm")
    n = unique_name("m")
    netns_add(ns)
    d = Daemon(tmpdir_short, tcp=False)
    try:
        assert d.unix.post("/v1/devices", {"name": n, "queues": 2}).status == 201
        subprocess.run(["ip", "link", "set", "dev", n, "netns", ns], check=True)
        assert net.settle(lambda: d.unix.get(f"/v1/devices/{n}").json().get("netns_home", {}).get("path") == f"/run/netns/{ns}", 10)
        d.stop(signal.SIGKILL)
        d = Daemon(tmpdir_short, tcp=False)
        dev = d.unix.get(f"/v1/devices/{n}").json()
        assert dev["state"] == "active" and dev["netns"]["name"] == ns, dev
        assert exists_in(ns, n) and not net.exists(n)
        assert d.unix.delete(f"/v1/devices/{n}").status == 204
    finally:
        d.stop()
        netns_del(ns)
        net.delete_link(n)


def test_a_single_queue_device(daemon, api, name):
    """multi_queue: false: no IFF_MULTI_QUEUE, one queue, counted; more queues are refused;
    a lease hands its one queue to a single-queue consumer."""
    import lease_client
    n = name()
    r = api.post("/v1/devices", {"name": n, "multi_queue": False, "up": False})
    assert r.status == 201 and r.json()["multi_queue"] is False, r
    flags = int(open(f"/sys/class/net/{n}/tun_flags").read(), 16)
    assert flags & net.IFF_MULTI_QUEUE == 0 and flags & net.IFF_TAP
    net.disable_ipv6(n)
    assert api.patch(f"/v1/devices/{n}", {"up": True}).status == 200
    mac = api.get(f"/v1/devices/{n}").json()["mac"]
    k0, t0 = net.kernel_stats(n)["tx_packets"], api.get(f"/v1/devices/{n}/stats").json()["total"]["rx_packets"]
    net.send_frames(n, mac, 100)
    assert net.settle(lambda: api.get(f"/v1/devices/{n}/stats").json()["total"]["rx_packets"] - t0
                      == net.kernel_stats(n)["tx_packets"] - k0 == 100, 10)
    r = api.post(f"/v1/devices/{n}/queues")
    assert r.status == 409 and r.code == "not_multi_queue", r
    r = api.patch(f"/v1/devices/{n}", {"queues": 2})
    assert r.status == 409 and r.code == "not_multi_queue", r
    r = api.post("/v1/devices", {"name": name(), "queues": 2, "multi_queue": False})
    assert r.status == 400 and r.code == "invalid_field", r
    # The kernel lets one file attach to such a device: a second open by name is EBUSY.
    try:
        os.close(net.open_tap(n, net.IFF_TAP | net.IFF_NO_PI))
        raise AssertionError("a second file attached to a one-queue device")
    except OSError as e:
        assert e.errno == 16, e
    # A lease hands its queue over (a single-queue VMM takes it with fds=).
    lease = lease_client.take(daemon.socket, n)
    assert isinstance(lease, lease_client.Lease), lease
    _, lflags = lease_client.getiff(lease.fds[0])
    assert lflags & net.IFF_MULTI_QUEUE == 0
    sent = net.send_frames(n, mac, 50)
    assert lease_client.drain(lease.fds) == sent
    # Its one queue cannot be detached from the holder: no revoke (a forced DELETE cuts it off).
    r = api.delete(f"/v1/devices/{n}/leases/{lease.id}")
    assert r.status == 409 and r.code == "not_multi_queue" and "force" in r.json()["error"]["message"], r
    lease.close()
    assert net.settle(lambda: api.get(f"/v1/devices/{n}").json()["consumer"] == "daemon")
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_single_queue_external_device_is_the_consumers(tmpdir_short):
    """multi_queue false in mode external: the daemon holds no file (the kernel lets one
    attach), keeps the device by persistence, sees the consumer's queue, survives a restart
    with the consumer attached, and deletes the link."""
    ns = unique_name("se")
    n = unique_name("s")
    netns_add(ns)
    d = Daemon(tmpdir_short, tcp=False)
    fd = None
    try:
        api = d.unix
        r = api.post("/v1/devices", {"name": n, "multi_queue": False, "mode": "external", "netns": ns})
        assert r.status == 201, r
        dev = r.json()
        assert dev["persist"] is True and dev["queue_count"] == 0 and dev["consumer"] == "external", dev
        assert dev["netns"]["name"] == ns and dev["foreign_queues"] == 0
        in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{n}.disable_ipv6=1")
        # The consumer opens it by name inside the namespace (the open must happen there).
        code = (f"import net, os\n"
                f"fd = net.open_tap({n!r}, net.IFF_TAP | net.IFF_NO_PI)\n"
                f"print('attached', flush=True)\n"
                f"n = 0\n"
                f"import select\n"
                f"p = select.poll(); p.register(fd, select.POLLIN)\n"
                f"while True:\n"
                f"    if not p.poll(3000): break\n"
                f"    os.read(fd, 65536); n += 1\n"
                f"print(n, flush=True)\n")
        consumer = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", code], stdout=subprocess.PIPE, text=True)
        assert consumer.stdout.readline().strip() == "attached"
        assert net.settle(lambda: api.get(f"/v1/devices/{n}").json()["foreign_queues"] == 1, 10)
        # A crash and a restart while the consumer holds it: taken on, not opened, not re-made.
        d.stop(signal.SIGKILL)
        d = Daemon(tmpdir_short, tcp=False)
        api = d.unix
        dev = api.get(f"/v1/devices/{n}").json()
        assert dev["state"] == "active" and dev["foreign_queues"] == 1 and dev["netns"]["name"] == ns, dev
        sent = send_in(ns, n, dev["mac"], 50)
        assert int(consumer.stdout.readline()) == sent, "the consumer got every frame"
        consumer.wait(timeout=10)
        assert net.settle(lambda: api.get(f"/v1/devices/{n}").json()["foreign_queues"] == 0, 10)
        assert exists_in(ns, n), "persistent: it outlives its consumer"
        r = api.patch(f"/v1/devices/{n}", {"mode": "sink"})
        assert r.status == 400 and r.json()["error"]["field"] == "mode", r
        assert api.patch(f"/v1/devices/{n}", {"mtu": 1400}).status == 200
        assert "mtu 1400" in in_ns(ns, "ip", "link", "show", "dev", n).stdout
        assert api.get(f"/v1/devices/{n}/stats").json()["kernel"]["tx_packets"] >= sent
        assert api.delete(f"/v1/devices/{n}").status == 204
        assert not exists_in(ns, n)
    finally:
        d.stop()
        netns_del(ns)


def test_the_cli_creates_in_a_namespace(daemon, api, name):
    ns = unique_name("nc")
    n = name()
    netns_add(ns)
    try:
        r = subprocess.run([MQTAP_BIN, "--socket", daemon.socket, "--json", "device", "create", n, "--netns", ns, "--ifname", "tap0",
                            "--single-queue", "--label", "pod=web-1", "--label", "team=net"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["kernel_name"] == "tap0" and d["multi_queue"] is False and d["labels"] == {"pod": "web-1", "team": "net"}
        assert exists_in(ns, "tap0")
        table = subprocess.run([MQTAP_BIN, "--socket", daemon.socket, "device", "show", n], capture_output=True, text=True).stdout
        assert "kernel name: tap0" in table and "single queue" in table and "pod=web-1" in table, table
        assert api.delete(f"/v1/devices/{n}").status == 204
    finally:
        netns_del(ns)


def netns_threads(pid):
    """The daemon's namespace helper threads: (tid, the inode of the namespace it is in)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != "mqtapd-netns":
                    continue
            found.append((tid, os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino))
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return found


def test_one_kept_helper_per_namespace_back_home_between_calls(tmpdir_short):
    """Reads of devices in another namespace go through one helper thread for that namespace,
    kept between calls (not one made per call), which waits in the daemon's own namespace: the
    helper itself never keeps a namespace alive. A daemon of its own: helpers are kept a few
    seconds after their last call, and keyed by the namespace's inode, which the kernel reuses."""
    daemon = Daemon(tmpdir_short, tcp=False)
    api = daemon.unix
    own = os.stat(f"/proc/{daemon.proc.pid}/ns/net").st_ino
    spaces = [unique_name("ns"), unique_name("ns")]
    devices = []
    try:
        assert netns_threads(daemon.proc.pid) == []
        for ns in spaces:
            netns_add(ns)
            d = unique_name("h")
            assert api.post("/v1/devices", {"name": d, "netns": ns, "queues": 2, "up": False}).status == 201
            devices.append(d)
        for _ in range(20):
            for d in devices:
                assert api.get(f"/v1/devices/{d}").status == 200
        helpers = netns_threads(daemon.proc.pid)
        # Exactly one helper per namespace reached into, kept.
        assert len(helpers) == 2, helpers
        mine = {t for t, _ in helpers}
        # Each back home between calls (looked at again if the observer's look at a device
        # had it in the other namespace at that instant).
        assert net.settle(lambda: all(ino == own for _, ino in netns_threads(daemon.proc.pid)), timeout=5), \
            (own, netns_threads(daemon.proc.pid))
        for d in devices:
            assert api.get(f"/v1/devices/{d}").status == 200
        assert {t for t, _ in netns_threads(daemon.proc.pid)} == mine, "the same threads serve again, and no other"
        for d in devices:
            assert api.delete(f"/v1/devices/{d}").status == 204
    finally:
        daemon.stop()
        for ns in spaces:
            netns_del(ns)
