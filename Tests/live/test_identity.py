"""Names are not identities (issue 11, breaks 2–4): a device renamed behind the daemon's back,
queues other processes attach by name, a persistence set from outside, and who may attach."""
import fcntl
import json
import os
import subprocess
import time

from conftest import MQTAP_BIN, Daemon, unique_name
import net
from net import sh

def ifindex(name):
    with open(f"/sys/class/net/{name}/ifindex") as f:
        return int(f.read())


def mtu(name):
    with open(f"/sys/class/net/{name}/mtu") as f:
        return int(f.read())


def is_up(name):
    with open(f"/sys/class/net/{name}/flags") as f:
        return int(f.read(), 16) & 1 == 1  # IFF_UP


def test_a_renamed_device_keeps_its_api_name_and_a_stranger_with_its_old_name_is_never_touched(daemon, api):
    a, b = unique_name("ra"), unique_name("rb")
    try:
        assert api.post("/v1/devices", {"name": a, "queues": 2, "up": False}).status == 201
        sh("ip", "link", "set", "dev", a, "name", b)
        net.disable_ipv6(b)  # no packets of the kernel's own once it is up: the counters stay still
        # Another interface takes the old name, as a container runtime's veth might.
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", a + "p")
        stranger = ifindex(a)
        info = net.settle(lambda: (lambda j: j if j.get("kernel_name") == b else None)(api.get(f"/v1/devices/{a}").json()))
        assert info, api.get(f"/v1/devices/{a}").json()
        assert info["ifindex"] == ifindex(b) and info["state"] == "active"
        assert f"renamed in the kernel to {b}" in info["state_reason"]
        assert net.settle(lambda: any("device renamed" in l and f"to={b}" in l for l in daemon.log)), daemon.log[-5:]

        r = api.patch(f"/v1/devices/{a}", {"mtu": 1400, "up": True})
        assert r.status == 200 and r.json()["mtu"] == 1400 and r.json()["up"] is True, r
        assert mtu(b) == 1400 and is_up(b)
        assert mtu(a) == 1500 and not is_up(a), "the stranger that took the name is untouched"
        assert api.get(f"/v1/devices/{a}").json()["mtu"] == 1400, "read from the device, not from the stranger"

        assert api.post(f"/v1/devices/{a}/queues", {"count": 1}).status == 201
        assert net.kernel_queue_count(b) == 3
        assert ifindex(a) == stranger and a not in net.tap_names(a), "no queue was opened by the old name"

        assert net.settle(lambda: api.get(f"/v1/devices/{a}/stats").json()["kernel"]["tx_packets"]
                          == net.kernel_stats(b)["tx_packets"])

        assert api.delete(f"/v1/devices/{a}").status == 204
        assert not net.exists(b) and ifindex(a) == stranger
    finally:
        net.delete_link(a)
        net.delete_link(b)


def test_a_restart_finds_a_renamed_persistent_device(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    p, q = unique_name("pa"), unique_name("pb")
    state = os.path.join(tmpdir_short, "state", "state.json")
    try:
        assert d.unix.post("/v1/devices", {"name": p, "queues": 2, "persist": True, "up": False}).status == 201
        sh("ip", "link", "set", "dev", p, "name", q)

        def saved():
            with open(state) as f:
                return next(x for x in json.load(f)["devices"] if x["name"] == p).get("kernel_name") == q
        assert net.settle(saved), "the rename is saved"
        assert d.stop() == 0
        assert net.exists(q) and net.kernel_queue_count(q) == 0 and not net.exists(p)

        d = Daemon(tmpdir_short, tcp=False)
        info = d.unix.get(f"/v1/devices/{p}").json()
        assert info["state"] == "active" and info["kernel_name"] == q and info["queue_count"] == 2, info
        assert net.kernel_queue_count(q) == 2
        assert not net.exists(p), "no new device was made under the old name"
        assert d.unix.delete(f"/v1/devices/{p}").status == 204
        assert not net.exists(q)
    finally:
        d.stop()
        net.delete_link(p)
        net.delete_link(q)


def test_foreign_queues_are_shown_counted_toward_the_limit_and_logged(daemon, api):
    f = unique_name("fq")
    fds = []
    try:
        assert api.post("/v1/devices", {"name": f, "queues": 2, "max_queues": 4}).status == 201
        assert api.get(f"/v1/devices/{f}").json()["foreign_queues"] == 0
        fds.append(net.open_tap(f))
        assert net.kernel_queue_count(f) == 3
        info = api.get(f"/v1/devices/{f}").json()
        assert info["foreign_queues"] == 1 and info["queue_count"] == 2, info
        assert f'mqtapd_device_foreign_queues{{device="{f}"}} 1' in api.get("/metrics").body.decode()
        # 2 own + 1 foreign + 2 > 4.
        r = api.post(f"/v1/devices/{f}/queues", {"count": 2})
        assert r.status == 409 and r.code == "queue_limit_exceeded", r
        assert net.kernel_queue_count(f) == 3, "nothing was half-made"
        r = api.patch(f"/v1/devices/{f}", {"queues": 4})
        assert r.status == 409 and r.code == "queue_limit_exceeded", r
        assert api.post(f"/v1/devices/{f}/queues", {"count": 1}).status == 201
        assert net.settle(lambda: any("queues attached by another process" in l and f"device={f}" in l for l in daemon.log))
        os.close(fds.pop())
        assert net.settle(lambda: api.get(f"/v1/devices/{f}").json()["foreign_queues"] == 0)
        # A queue held elsewhere would keep the link after the daemon's fds close: DELETE
        # deletes the link, so 204 means it is gone.
        fds.append(net.open_tap(f))
        assert api.delete(f"/v1/devices/{f}").status == 204
        assert not net.exists(f)
    finally:
        for fd in fds:
            os.close(fd)
        net.delete_link(f)


def test_delete_removes_a_device_persisted_from_outside(daemon, api):
    e = unique_name("ep")
    try:
        assert api.post("/v1/devices", {"name": e, "queues": 2}).status == 201
        fd = net.open_tap(e)
        fcntl.ioctl(fd, net.TUNSETPERSIST, 1)
        os.close(fd)
        assert api.delete(f"/v1/devices/{e}").status == 204
        assert not net.exists(e), "after 204 the link is gone"
    finally:
        net.delete_link(e)


ATTACH = f"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
try:
    fcntl.ioctl(fd, {net.TUNSETIFF}, struct.pack("16sH22x", sys.argv[1].encode(), {net.IFF_TAP | net.IFF_NO_PI | net.IFF_MULTI_QUEUE}))
    print("attached")
except OSError as e:
    print(e.errno)
"""


def attach_as(uid, gid, name):
    r = sh("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "/usr/bin/python3", "-c", ATTACH, name)
    return r.stdout.strip()


def test_owner_and_group_decide_who_may_attach(daemon, api):
    o, g = unique_name("ow"), unique_name("og")
    try:
        r = api.post("/v1/devices", {"name": o, "queues": 1, "owner": 65534})
        assert r.status == 201 and r.json()["owner"] == 65534 and "group" not in r.json(), r
        assert "user nobody" in sh("ip", "-d", "link", "show", "dev", o).stdout
        assert attach_as(65533, 65533, o) == "1", "EPERM for anyone else"
        assert attach_as(65534, 65534, o) == "attached"
        # The CLI takes a name and sends its id.
        nogroup = int(sh("getent", "group", "nogroup").stdout.split(":")[2])
        cli = sh(MQTAP_BIN, "device", "create", g, "--group", "nogroup",
                 "--socket", daemon.socket, check=False)
        assert cli.returncode == 0, cli.stderr
        assert api.get(f"/v1/devices/{g}").json()["group"] == nogroup
        assert attach_as(65533, 65533, g) == "1"
        assert attach_as(65533, nogroup, g) == "attached"
        for bad in ({"owner": "nobody"}, {"group": -1}, {"owner": 4294967295}, {"owner": True}):
            r = api.post("/v1/devices", {"name": unique_name("ob"), **bad})
            assert r.status == 400 and r.json()["error"]["field"] == next(iter(bad)), r
        cli = sh(MQTAP_BIN, "device", "create", unique_name("ob"),
                 "--owner", "no-such-user-x", "--socket", daemon.socket, check=False)
        assert cli.returncode != 0 and "no user is called no-such-user-x" in cli.stderr
    finally:
        for n in (o, g):
            api.delete(f"/v1/devices/{n}", check=False)
            net.delete_link(n)


# MARK: persistent leftovers


def test_a_persistent_create_that_cannot_be_recorded_makes_nothing(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    n = unique_name("pi")
    blocker = os.path.join(tmpdir_short, "state", "state.json.tmp")
    try:
        os.mkdir(blocker)  # the state file cannot be written now
        r = d.unix.post("/v1/devices", {"name": n, "queues": 2, "persist": True})
        assert r.status == 503 and r.code == "resource_exhausted", r
        assert not net.exists(n), "nothing persistent is made that the state file does not know"
        os.rmdir(blocker)
        assert d.unix.post("/v1/devices", {"name": n, "queues": 2, "persist": True}).status == 201
        with open(os.path.join(tmpdir_short, "state", "state.json")) as f:
            assert n in {x["name"] for x in json.load(f)["devices"]}
        assert d.unix.delete(f"/v1/devices/{n}").status == 204
    finally:
        if os.path.isdir(blocker):
            os.rmdir(blocker)
        d.stop()
        net.delete_link(n)


def test_kill_9_during_persistent_creates_leaves_no_device_the_api_does_not_know(tmpdir_short):
    names = []
    try:
        state = os.path.join(tmpdir_short, "state", "state.json")
        # Fixed delays, and last a kill once the create is recorded (however slow the machine).
        for delay in (0.0, 0.02, 0.05, 0.1, 0.2, None):
            d = Daemon(tmpdir_short, tcp=False)
            n = unique_name("pk")
            names.append(n)
            t = subprocess.Popen(["curl", "-s", "--unix-socket", d.socket, "-X", "POST", "-H", "Content-Type: application/json",
                                  "-d", json.dumps({"name": n, "queues": 256, "persist": True}), "http://x/v1/devices"],
                                 stdout=subprocess.DEVNULL)
            if delay is None:
                assert net.settle(lambda: os.path.exists(state) and n in open(state).read())
            else:
                time.sleep(delay)
            d.proc.kill()
            d.stop()
            t.wait(10)
        d = Daemon(tmpdir_short, tcp=False)
        listed = {x["name"]: x for x in d.unix.get("/v1/devices").json()["devices"]}
        # Some create reached the daemon before its kill (else nothing was tested here).
        assert listed, "no create was recorded before any kill"
        for n in names:
            if net.exists(n):
                assert n in listed and listed[n]["state"] == "active", (n, listed.get(n))
                assert net.kernel_queue_count(n) == listed[n]["queue_count"]
        for n in listed:
            assert d.unix.delete(f"/v1/devices/{n}").status == 204
        assert not any(net.exists(n) for n in names)
        assert d.stop() == 0
    finally:
        for n in names:
            net.delete_link(n)


def test_a_restart_reclaims_a_device_persisted_from_outside(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    x = unique_name("px")
    try:
        assert d.unix.post("/v1/devices", {"name": x, "queues": 2}).status == 201
        fd = net.open_tap(x)
        fcntl.ioctl(fd, net.TUNSETPERSIST, 1)
        os.close(fd)
        assert d.stop() == 0
        assert net.exists(x) and net.kernel_queue_count(x) == 0, "the outside persistence kept it"
        d = Daemon(tmpdir_short, tcp=False)
        info = d.unix.get(f"/v1/devices/{x}").json()
        assert info["state"] == "active" and info["persist"] is False and info["queue_count"] == 2, info
        assert net.kernel_queue_count(x) == 2
        assert any("device reclaimed" in l for l in d.log)
        assert d.stop() == 0
        assert not net.exists(x), "not persistent again: it went with the daemon's fds"
    finally:
        d.stop()
        net.delete_link(x)
