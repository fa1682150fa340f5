"""A real QEMU guest on a leased device: `mqtap lease DEV -- qemu … fds={fds}`. The guest's
virtio-net enables as many queue pairs as it has vCPUs and QEMU detaches the rest, which the
API shows; the guest pings the tap; when QEMU exits the daemon reads every queue again. And a
daemon killed with -9 while QEMU holds the lease does not take the guest's network down."""
import os
import signal
import subprocess

import pytest

import net
from conftest import MQTAP_BIN, Daemon, build_guest, unique_name

HOST_IP, GUEST_IP = "198.18.0.1", "198.18.0.2"


@pytest.fixture(scope="module")
def guest():
    """The kernel and initramfs, built from Debian packages by scripts/build-guest.sh."""
    return build_guest()


def start_vm(d, dev, guest, serial, hold):
    kernel, initrd = guest
    cmdline = f"console=ttyS0 quiet panic=-1 mqt.ip={GUEST_IP}/24 mqt.peer={HOST_IP} " + \
        ("mqt.hold=1" if hold else "mqt.count=20 mqt.min=10")
    # mqtap execs QEMU: the process is QEMU, holding the queue fds and the lease connection.
    return subprocess.Popen([
        MQTAP_BIN, "lease", dev, "--socket", d.socket, "--holder", "qemu", "--",
        "qemu-system-x86_64", "-accel", "tcg", "-smp", "2", "-m", "256", "-kernel", kernel, "-initrd", initrd,
        "-append", cmdline, "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{serial}",
        "-netdev", "tap,id=n0,fds={fds},vhost=off", "-device", "virtio-net-pci,netdev=n0,mq=on,vectors=10",
    ], stdout=subprocess.DEVNULL, stderr=open(serial + ".stderr", "w"))


def setup_device(api, dev):
    assert api.post("/v1/devices", {"name": dev, "queues": 4}).status == 201
    net.disable_ipv6(dev)
    subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", dev], check=True)


def pings_ok(serial):
    return sum(1 for l in net.read_lines(serial) if l.startswith("MQT-PING ") and l.endswith(" ok"))


def test_qemu_guest_on_a_leased_device(guest, tmpdir_short):
    d = Daemon(tmpdir_short)
    dev = unique_name("vm")
    serial = os.path.join(tmpdir_short, "serial.log")
    vm = None
    try:
        setup_device(d.unix, dev)
        k0 = net.kernel_stats(dev)
        vm = start_vm(d, dev, guest, serial, hold=False)
        assert net.settle(lambda: any(l.startswith("MQT-READY") for l in net.read_lines(serial)),
                          120, every=0.2), "timed out waiting for the guest to boot"
        # Two vCPUs: the guest enables 2 of the 4 queue pairs; QEMU detaches the other 2.
        api = d.unix
        assert net.settle(lambda: [q["enabled"] for q in api.get(f"/v1/devices/{dev}").json()["queues"]].count(True) == 2,
                          60, every=0.2), "timed out waiting for 2 queues enabled"
        device = api.get(f"/v1/devices/{dev}").json()
        assert device["enabled_queues"] == 2 and device["queue_count"] == 4
        assert all(q["leased"] and q["lease_state"] == "live" for q in device["queues"])
        assert net.queue_counts(dev) == (2, 2), "the API shows what the kernel has"
        rc = vm.wait(timeout=120)
        assert rc == 0, open(serial + ".stderr").read()[-2000:]
        lines = net.read_lines(serial)
        assert any(l.startswith("MQT-PING-OK") for l in lines), lines[-20:]
        k1 = net.kernel_stats(dev)
        assert k1["rx_packets"] - k0["rx_packets"] >= 10 and k1["tx_packets"] > k0["tx_packets"]
        # QEMU exited: the lease ended, every queue is attached again and read by the daemon.
        assert net.settle(lambda: all(q["enabled"] and not q["leased"] for q in api.get(f"/v1/devices/{dev}").json()["queues"]),
                          60, every=0.2), "timed out waiting for the queues to come back"
        assert net.queue_counts(dev) == (4, 0)
        assert api.get(f"/v1/devices/{dev}/leases").json()["leases"] == []
        mac = api.get(f"/v1/devices/{dev}").json()["mac"]
        before = api.get(f"/v1/devices/{dev}/stats").json()["total"]["rx_packets"]
        net.send_frames(dev, mac, 100)
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}/stats").json()["total"]["rx_packets"] >= before + 100)
        assert api.delete(f"/v1/devices/{dev}").status == 204
        assert not net.exists(dev)
    finally:
        if vm and vm.poll() is None:
            vm.kill()
            vm.wait()
        assert d.stop() == 0
        net.delete_link(dev)


def test_a_daemon_killed_while_qemu_holds_a_lease(guest, tmpdir_short):
    d = Daemon(tmpdir_short)
    dev = unique_name("vk")
    serial = os.path.join(tmpdir_short, "serial.log")
    vm = None
    try:
        setup_device(d.unix, dev)
        vm = start_vm(d, dev, guest, serial, hold=True)
        assert net.settle(lambda: pings_ok(serial) >= 3, 120, every=0.2), "timed out waiting for the guest to ping"
        lease = d.unix.get(f"/v1/devices/{dev}/leases").json()["leases"][0]
        d.stop(signal.SIGKILL)
        # The guest's network does not go down with the daemon.
        seen = pings_ok(serial)
        assert net.settle(lambda: pings_ok(serial) >= seen + 5,
                          30, every=0.2), "timed out waiting for pings after the daemon died"
        assert net.exists(dev)
        d = Daemon(tmpdir_short)
        api = d.unix
        device = api.get(f"/v1/devices/{dev}").json()
        assert device["state"] == "active" and device["queue_count"] == 4
        assert all(q["lease"] == lease["id"] and q["lease_state"] == "orphaned" for q in device["queues"])
        leases = api.get(f"/v1/devices/{dev}/leases").json()["leases"]
        assert [(l["id"], l["state"], l["holder"]) for l in leases] == [(lease["id"], "orphaned", "qemu")]
        assert api.get("/v1/limits").json()["queues_in_use"] >= 4
        r = api.delete(f"/v1/devices/{dev}")
        assert r.status == 409 and r.code == "device_leased", r
        seen = pings_ok(serial)
        assert net.settle(lambda: pings_ok(serial) >= seen + 3,
                          30, every=0.2), "timed out waiting for pings after the restart"
        assert net.queue_counts(dev) is not None, "nothing was deleted or re-created"
        vm.send_signal(signal.SIGTERM)
        vm.wait(timeout=30)
        # The holder is gone and the device (not persistent) with it: the daemon, which found
        # it by its index, notices and forgets it, its orphaned lease with it. Nothing is left.
        assert net.settle(lambda: not net.exists(dev))
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}").status == 404, 10)
        assert api.get("/v1/devices").json()["devices"] == []
    finally:
        if vm and vm.poll() is None:
            vm.kill()
            vm.wait()
        assert d.stop() == 0
        net.delete_link(dev)


def test_qemu_virtio_1_0_header_is_put_back_and_counts_stay_exact(guest, tmpdir_short):
    """QEMU on leased queues of a vnet_hdr device negotiates virtio 1.0 and sets the device's
    vnet header size to 12 (TUNSETVNETHDRSZ is device-wide). While it runs the device shows
    12 and the lease has every frame; once it exits the daemon puts 10 back, and in sink, echo
    and forward every count matches the kernel's, packets and bytes."""
    d = Daemon(tmpdir_short)
    dev, peer = unique_name("vh"), unique_name("vp")
    serial = os.path.join(tmpdir_short, "serial.log")
    vm = None
    api = d.unix
    try:
        assert api.post("/v1/devices", {"name": dev, "queues": 4, "vnet_hdr": True, "up": False}).status == 201
        net.disable_ipv6(dev)
        assert api.patch(f"/v1/devices/{dev}", {"up": True}).status == 200
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", dev], check=True)
        assert api.get(f"/v1/devices/{dev}").json()["vnet_hdr_size"] == 10
        vm = start_vm(d, dev, guest, serial, hold=True)
        assert net.settle(lambda: pings_ok(serial) >= 3, 120, every=0.2), "timed out waiting for the guest to ping"
        shown = api.get(f"/v1/devices/{dev}").json()
        assert shown["vnet_hdr_size"] == 12 and "vnet_hdr_size" in shown["settings_differ"], shown
        assert shown["consumer"] == "lease"
        t0 = api.get(f"/v1/devices/{dev}/stats").json()["total"]
        vm.send_signal(signal.SIGTERM)
        vm.wait(timeout=30)
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}").json()["consumer"] == "daemon", 30)
        shown = api.get(f"/v1/devices/{dev}").json()
        assert shown["vnet_hdr_size"] == 10 and shown["settings_differ"] == [], shown
        assert api.get(f"/v1/devices/{dev}/stats").json()["total"]["rx_packets"] == t0["rx_packets"], \
            "the daemon read nothing while QEMU held the device"
        subprocess.run(["ip", "addr", "flush", "dev", dev], check=True)
        mac = shown["mac"]
        assert api.post("/v1/devices", {"name": peer, "queues": 2, "vnet_hdr": True, "up": False}).status == 201
        net.disable_ipv6(peer)
        assert api.patch(f"/v1/devices/{peer}", {"up": True}).status == 200

        for mode in ({"mode": "sink"}, {"mode": "echo"}, {"mode": "forward", "peer": peer}):
            assert api.patch(f"/v1/devices/{dev}", mode).status == 200
            k0, t0 = net.kernel_stats(dev), api.get(f"/v1/devices/{dev}/stats").json()["total"]
            p0 = net.kernel_stats(peer)
            net.send_frames(dev, mac, 300)

            def exact():
                k, t = net.kernel_stats(dev), api.get(f"/v1/devices/{dev}/stats").json()["total"]
                ok = (t["rx_packets"] - t0["rx_packets"] == k["tx_packets"] - k0["tx_packets"] == 300
                      and t["rx_bytes"] - t0["rx_bytes"] == k["tx_bytes"] - k0["tx_bytes"])
                if mode["mode"] == "echo":
                    ok = ok and t["tx_bytes"] - t0["tx_bytes"] == k["rx_bytes"] - k0["rx_bytes"] == t["rx_bytes"] - t0["rx_bytes"]
                if mode["mode"] == "forward":
                    p = net.kernel_stats(peer)
                    ok = ok and p["rx_bytes"] - p0["rx_bytes"] == t["rx_bytes"] - t0["rx_bytes"]
                return ok
            assert net.settle(exact, 15), (mode, net.kernel_stats(dev), k0, api.get(f"/v1/devices/{dev}/stats").json()["total"], t0)
        assert api.delete(f"/v1/devices/{dev}").status == 204
        assert api.delete(f"/v1/devices/{peer}").status == 204
    finally:
        if vm and vm.poll() is None:
            vm.kill()
            vm.wait()
        assert d.stop() == 0
        net.delete_link(dev)
        net.delete_link(peer)
