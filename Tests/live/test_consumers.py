"""One consumer per device (issue 19) on real taps: `external` mode leaves every frame to the
processes that attach by name; a lease takes the device; a holder's device-wide settings (vnet
header size, owner) are shown, never misread, and put back when it goes; a revoke holds; a
removed queue's counts stay in the total."""
import fcntl
import os
import struct

import lease_client
import net
from events_client import Watcher


def device(api, n):
    return api.get(f"/v1/devices/{n}").json()


def total(api, n):
    return api.get(f"/v1/devices/{n}/stats").json()["total"]


def make(api, n, **spec):
    """A device with no traffic of the kernel's own (IPv6 off before it goes up)."""
    up = spec.pop("up", True)
    r = api.post("/v1/devices", {"name": n, "up": False, **spec})
    assert r.status == 201, r
    net.disable_ipv6(n)
    if up:
        assert api.patch(f"/v1/devices/{n}", {"up": True}).status == 200
    return r.json()



def set_hdr_size(fd, size):
    fcntl.ioctl(fd, net.TUNSETVNETHDRSZ, struct.pack("i", size))


def exact(api, n, k0, t0):
    """The daemon's total moved exactly as the kernel's counters did since (k0, t0)."""
    def check():
        k, t = net.kernel_stats(n), total(api, n)
        return (t["rx_packets"] - t0["rx_packets"] == k["tx_packets"] - k0["tx_packets"]
                and t["rx_bytes"] - t0["rx_bytes"] == k["tx_bytes"] - k0["tx_bytes"])
    return net.settle(check, 10)


def snapshot(api, n):
    return net.kernel_stats(n), total(api, n)


def test_external_mode_gives_every_frame_to_the_by_name_consumers(daemon, api, name):
    n = name()
    d = make(api, n, queues=4, mode="external")
    assert d["mode"] == "external" and d["consumer"] == "external"
    assert d["queue_count"] == 4 and d["enabled_queues"] == 0, "the daemon's own queues are held detached"
    assert net.queue_counts(n) == (0, 4)
    fds = [net.open_tap(n) for _ in range(4)]
    try:
        assert net.settle(lambda: device(api, n)["foreign_queues"] == 4)
        d = device(api, n)
        assert d["consumer"] == "external" and "state_reason" not in d, "foreign queues are expected here"
        k0, t0 = snapshot(api, n)
        sent = net.send_frames(n, d["mac"], 300)
        got = lease_client.drain(fds)
        assert got == sent == net.kernel_stats(n)["tx_packets"] - k0["tx_packets"]
        assert total(api, n) == t0, "the daemon read nothing"
        # Its queues are not the API's to attach while the mode is external.
        r = api.patch(f"/v1/devices/{n}/queues/1", {"enabled": True})
        assert r.status == 409 and r.code == "queues_held", r
        r = api.patch(f"/v1/devices/{n}", {"enabled_queues": 4})
        assert r.status == 409 and r.code == "queues_held", r
        # Its consumers attach by name: no lease on top of them.
        r = lease_client.take(daemon.socket, n)
        assert not isinstance(r, lease_client.Lease) and r.status == 409 and r.code == "consumer_conflict", r
    finally:
        for fd in fds:
            os.close(fd)
    assert net.settle(lambda: device(api, n)["foreign_queues"] == 0)
    # Back to the daemon: its queues attach and are read, with exact counts.
    r = api.patch(f"/v1/devices/{n}", {"mode": "sink"})
    assert r.status == 200 and r.json()["enabled_queues"] == 4 and r.json()["consumer"] == "daemon", r
    assert net.queue_counts(n) == (4, 0)
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 200)
    assert exact(api, n, k0, t0)
    # And external again by PATCH.
    r = api.patch(f"/v1/devices/{n}", {"mode": "external"})
    assert r.status == 200 and r.json()["enabled_queues"] == 0 and net.queue_counts(n) == (0, 4), r
    # A queue added to an external device is held too.
    assert api.post(f"/v1/devices/{n}/queues").status == 201
    assert net.queue_counts(n) == (0, 5)
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_lease_takes_the_device(daemon, api, name):
    n = name()
    d = make(api, n, queues=4)
    lease = lease_client.take(daemon.socket, n, {"queues": [0, 1]})
    try:
        assert isinstance(lease, lease_client.Lease), lease
        d = device(api, n)
        assert d["consumer"] == "lease"
        assert [(q["id"], q["enabled"]) for q in d["queues"]] == [(0, True), (1, True), (2, False), (3, False)]
        assert net.queue_counts(n) == (2, 2)
        k0, t0 = snapshot(api, n)
        sent = net.send_frames(n, d["mac"], 300)
        assert lease_client.drain(lease.fds) == sent, "the holder gets every frame"
        assert total(api, n) == t0
        r = api.patch(f"/v1/devices/{n}/queues/3", {"enabled": True})
        assert r.status == 409 and r.code == "queues_held", r
    finally:
        lease.close()
    assert net.settle(lambda: device(api, n)["consumer"] == "daemon")
    assert net.settle(lambda: net.queue_counts(n) == (4, 0))
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 200)
    assert exact(api, n, k0, t0)
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_one_consumer_for_forwarding(daemon, api, name):
    a, b = name(), name()
    make(api, a, queues=2)
    make(api, b, queues=2, mode="forward", peer=a)
    for dev in (a, b):
        r = lease_client.take(daemon.socket, dev)
        assert not isinstance(r, lease_client.Lease) and r.status == 409 and r.code == "device_forwarding", r
    r = api.patch(f"/v1/devices/{a}", {"mode": "external"})
    assert r.status == 409 and r.code == "device_forwarding" and r.json()["error"]["field"] == "mode", r
    assert api.patch(f"/v1/devices/{b}", {"mode": "sink"}).status == 200
    lease = lease_client.take(daemon.socket, a)
    try:
        assert isinstance(lease, lease_client.Lease), lease
        r = api.patch(f"/v1/devices/{b}", {"mode": "forward", "peer": a})
        assert r.status == 409 and r.code == "device_forwarding" and r.json()["error"]["field"] == "peer", r
    finally:
        lease.close()
    assert net.settle(lambda: device(api, a)["consumer"] == "daemon")
    assert api.patch(f"/v1/devices/{b}", {"mode": "forward", "peer": a}).status == 200
    for dev in (b, a):
        assert api.delete(f"/v1/devices/{dev}").status == 204


def test_a_holders_header_size_is_shown_never_misread_and_put_back(daemon, api, name):
    n = name()
    d = make(api, n, queues=2, vnet_hdr=True)
    w = Watcher(daemon.socket, f"?device={n}")
    assert d["vnet_hdr_size"] == 10 and d["settings_differ"] == []
    lease = lease_client.take(daemon.socket, n, {"queues": [0]})
    try:
        set_hdr_size(lease.fds[0], 12)
        d = device(api, n)
        assert d["vnet_hdr_size"] == 12 and d["settings_differ"] == ["vnet_hdr_size"], d
    finally:
        lease.close()
    assert net.settle(lambda: device(api, n)["consumer"] == "daemon")
    d = device(api, n)
    assert d["vnet_hdr_size"] == 10 and d["settings_differ"] == [], d
    assert w.wait(lambda w: any(e["type"] == "device.changed" and e.get("by") == "daemon"
                                and "vnet_hdr_size" in e["changes"]["restored"] for e in w.events), 10), w.events
    w.close()
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 200)
    assert exact(api, n, k0, t0), "counts exact again: the header is the daemon's size"

    # A process that attaches by name (sink mode: frames are split) and sets 12: the workers
    # stop reading the device rather than misread it, and read again once it is gone.
    fd = net.open_tap(n)
    try:
        set_hdr_size(fd, 12)
        assert net.settle(lambda: "vnet header size is 12" in device(api, n).get("state_reason", ""), 10), device(api, n)
        k0, t0 = snapshot(api, n)
        sent = net.send_frames(n, d["mac"], 100)
        # The daemon's queues are detached: every frame is the other holder's, none waits for
        # the workers to read it later.
        assert lease_client.drain([fd]) == sent
        assert total(api, n) == t0, "no frame read with the wrong header size"
    finally:
        os.close(fd)
    assert net.settle(lambda: device(api, n)["vnet_hdr_size"] == 10 and device(api, n)["enabled_queues"] == 2, 10)
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 200)
    assert exact(api, n, k0, t0)
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_the_owner_a_holder_sets_is_shown_and_put_back(daemon, api, name):
    n = name()
    make(api, n, queues=2, owner=0)
    lease = lease_client.take(daemon.socket, n)
    try:
        fcntl.ioctl(lease.fds[0], net.TUNSETOWNER, 65534)
        assert int(open(f"/sys/class/net/{n}/owner").read()) == 65534
        d = device(api, n)
        assert d["owner"] == 65534 and "owner" in d["settings_differ"], d
    finally:
        lease.close()
    assert net.settle(lambda: device(api, n)["owner"] == 0)
    assert int(open(f"/sys/class/net/{n}/owner").read()) == 0
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_revoked_holder_gets_nothing_back(daemon, api, name):
    n = name()
    d = make(api, n, queues=2)
    lease = lease_client.take(daemon.socket, n)
    assert isinstance(lease, lease_client.Lease), lease
    fds = list(lease.fds)
    lease.fds = []  # kept open: the former holder does not let go
    try:
        assert api.delete(f"/v1/devices/{n}/leases/{lease.id}").status == 204
        d = device(api, n)
        assert d["queue_count"] == 2 and d["enabled_queues"] == 2 and d["revoked_queues"] == 2, d
        assert d["consumer"] == "daemon" and not any(q["leased"] for q in d["queues"])
        # The former holder attaches its file again (no privilege needed): undone.
        for fd in fds:
            lease_client.set_queue(fd, True)
        assert net.settle(lambda: net.queue_counts(n) == (2, 2), 5), net.queue_counts(n)
        k0, t0 = snapshot(api, n)
        net.send_frames(n, d["mac"], 200)
        assert lease_client.drain(fds) == 0, "the revoked files receive nothing"
        assert exact(api, n, k0, t0)
        # The former holder still has its files: DELETE deletes the link all the same.
        assert api.delete(f"/v1/devices/{n}").status == 204
        assert not net.exists(n), "the link is gone although a former holder keeps its files"
    finally:
        lease.sock.close()
        for fd in fds:
            os.close(fd)


def test_a_removed_queue_stays_in_the_total(api, name):
    n = name()
    d = make(api, n, queues=4)
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 300)
    assert exact(api, n, k0, t0)
    assert api.delete(f"/v1/devices/{n}/queues/3").status == 204
    assert api.delete(f"/v1/devices/{n}/queues/1").status == 204
    assert exact(api, n, k0, t0), "the total keeps what removed queues counted"
    net.send_frames(n, d["mac"], 100)
    assert exact(api, n, k0, t0)
    assert api.delete(f"/v1/devices/{n}").status == 204


HOLDER = f"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, {net.TUNSETIFF}, struct.pack("16sH22x", sys.argv[1].encode(), {net.IFF_TAP | net.IFF_NO_PI | net.IFF_MULTI_QUEUE | net.IFF_VNET_HDR}))
fcntl.ioctl(fd, {net.TUNSETVNETHDRSZ}, struct.pack("i", 12))
fcntl.ioctl(fd, {net.TUNSETGROUP}, 65534)
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_unprivileged_owner_by_name_cannot_corrupt_a_count(api, name):
    """The device's owner (no privilege) attaches by name and sets the header size and a
    group: shown, the workers stop reading rather than misread, and once it goes the size is
    put back (the group, which the kernel cannot clear, stays shown) and counts are exact."""
    import subprocess
    n = name()
    d = make(api, n, queues=2, vnet_hdr=True, owner=65534)
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", HOLDER, n],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert net.settle(lambda: device(api, n)["enabled_queues"] == 0, 10), device(api, n)
        shown = device(api, n)
        assert shown["vnet_hdr_size"] == 12 and shown["group"] == 65534, shown
        assert {"vnet_hdr_size", "group"} <= set(shown["settings_differ"]), shown
        assert "vnet header size is 12" in shown["state_reason"]
        k0, t0 = snapshot(api, n)
        net.send_frames(n, d["mac"], 100)
        assert total(api, n) == t0, "nothing read with a header size the workers do not expect"
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    assert net.settle(lambda: device(api, n)["enabled_queues"] == 2 and device(api, n)["vnet_hdr_size"] == 10, 10)
    shown = device(api, n)
    assert shown["settings_differ"] == ["group"] and shown["owner"] == 65534, shown
    k0, t0 = snapshot(api, n)
    net.send_frames(n, d["mac"], 200)
    assert exact(api, n, k0, t0)
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_file_once_handed_out_stays_non_blocking(daemon, api, name):
    """O_NONBLOCK belongs to the open file, which a holder shares: after a lease of a
    one-queue device ends (the holder kept a copy), the daemon reads the queue again without
    ever switching the file to blocking reads behind the holder's back."""
    n = name()
    d = make(api, n, queues=1)
    lease = lease_client.take(daemon.socket, n)
    kept = os.dup(lease.fds[0])
    try:
        assert fcntl.fcntl(kept, fcntl.F_GETFL) & os.O_NONBLOCK, "handed out non-blocking"
        lease.close()
        assert net.settle(lambda: device(api, n)["consumer"] == "daemon")
        k0, t0 = snapshot(api, n)
        net.send_frames(n, d["mac"], 200)
        assert exact(api, n, k0, t0), "the daemon reads the queue again"
        assert fcntl.fcntl(kept, fcntl.F_GETFL) & os.O_NONBLOCK, "still non-blocking for the holder"
    finally:
        os.close(kept)
    assert api.delete(f"/v1/devices/{n}").status == 204
