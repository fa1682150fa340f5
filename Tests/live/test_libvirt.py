"""A real libvirt domain on a device of the daemon's, attached the way OpenStack Nova and KubeVirt
attach taps they did not create: `<interface type='ethernet'>` with `<target dev=DEV
managed='no'/>` and `<driver queues='4'/>`, which libvirt opens by name (TUNSETIFF, 4 times)
and hands to QEMU. The daemon keeps its own 4 queues detached and reads nothing; the guest
gets all 4 queue pairs, pings the host and is pinged without a loss, 200 UDP flows from the
host reach the tap's queues (the kernel's counters) and not the daemon's, the API shows the 4
queues libvirt attached (`foreign_queues`) while the domain runs and none once it is
destroyed, and the device outlives the domain.

libvirtd is a private one (libvirt_host.py): its own config, sockets and state in a
temporary directory, bind-mounted in its own mount namespace; /etc is left as it was."""
import os
import socket
import subprocess
from xml.sax.saxutils import escape

import pytest

import libvirt_host
import net
from conftest import BIN, GUEST, Daemon, build_guest, need, unique_name

# 198.18.0.0/15 (benchmarking), a /24 test_qemu.py does not use: the two may run at once.
HOST_IP, GUEST_IP = "198.19.77.1", "198.19.77.2"
GUEST_MAC = "52:54:00:4d:51:02"
QUEUES = 4
PINGS = 10
FLOWS = 200


def create_external_device(api, dev):
    """A device of QUEUES queues in mode external, for libvirt to attach by name: the daemon
    keeps its own queue fds, detached, and reads nothing. Returns the Device."""
    # With a vnet header, as libvirt opens a virtio tap: QEMU then sets the device's header
    # size (12, virtio 1.0) and offloads, which the daemon must put back afterwards.
    r = api.post("/v1/devices", {"name": dev, "queues": QUEUES, "mode": "external", "vnet_hdr": True})
    assert r.status == 201, r
    d = r.json()
    assert d["consumer"] == "external" and d["enabled_queues"] == 0, d
    return d


@pytest.fixture(scope="module")
def guest():
    """The kernel and initramfs, built from Debian packages by scripts/build-guest.sh."""
    kernel_initrd = build_guest()
    with open(os.path.join(GUEST, "guest.env")) as f:
        need("ETHTOOL=yes" in f.read(), "the guest has no ethtool, so mqt.queues cannot enable 4 queue pairs")
    return kernel_initrd


@pytest.fixture(scope="module")
def libvirtd():
    try:
        libvirt_host.ensure_packages()
    except libvirt_host.Unavailable as e:
        need(False, str(e))
    lv = libvirt_host.Libvirtd().start()
    if os.access("/usr/bin/qemu-system-x86_64", os.X_OK):
        lv.warm()  # QEMU's capabilities are probed while the guest is built (which installs QEMU)
    yield lv
    logs = lv.logs()
    problems = lv.stop()
    assert not problems, "\n".join(problems) + "\n" + logs


def domain_xml(name, dev, guest, serial):
    kernel, initrd = guest
    # 2 vCPUs enable 2 queue pairs by default; mqt.queues has the guest's ethtool enable all 4.
    # mqt.hold: the guest pings the host until the domain is destroyed.
    cmdline = (f"console=ttyS0 quiet panic=-1 mqt.ip={GUEST_IP}/24 mqt.peer={HOST_IP} "
               f"mqt.queues={QUEUES} mqt.hold=1")
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(kernel)}</kernel>
    <initrd>{escape(initrd)}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='ethernet'>
      <mac address='{GUEST_MAC}'/>
      <target dev='{escape(dev)}' managed='no'/>
      <model type='virtio'/>
      <driver queues='{QUEUES}'/>
    </interface>
    <serial type='file'>
      <source path='{escape(serial)}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def ready_line(serial):
    return next((l for l in net.read_lines(serial) if l.startswith("MQT-READY")), None)


def guest_pings(serial):
    """(answered, lost) among the guest's pings of the host so far."""
    results = [l.rsplit(" ", 1)[-1] for l in net.read_lines(serial) if l.startswith("MQT-PING ")]
    return results.count("ok"), results.count("lost")


def send_udp_flows(count):
    """One datagram to each of `count` ports of the guest: `count` flows, which the kernel
    spreads over the tap's queues by their hash."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST_IP, 0))
        for i in range(count):
            s.sendto(b"mqtapd-libvirt", (GUEST_IP, 20000 + i))
    finally:
        s.close()


def test_libvirt_domain_on_an_external_device(libvirtd, guest, tmpdir_short):
    need(os.access(BIN, os.X_OK), f"no mqtapd binary at {BIN}")
    need(os.path.exists("/usr/bin/ping") or os.path.exists("/bin/ping"), "no ping (iputils-ping)")
    d = Daemon(tmpdir_short)
    api = d.unix
    dev = unique_name("lv")
    dom = f"{dev}-vm"
    serial = os.path.join(tmpdir_short, "serial.log")
    had_virbr0 = net.exists("virbr0")
    defined = False
    why = lambda: ("serial console:\n" + "\n".join(net.read_lines(serial)[-15:]) + "\nQEMU's log:\n" +
                   libvirtd.qemu_log(dom)[-2000:] + "\n" + libvirtd.logs(1500))
    try:
        device = create_external_device(api, dev)
        assert device["queue_count"] == QUEUES and device["enabled_queues"] == 0
        assert device["foreign_queues"] == 0
        assert net.queue_counts(dev) == (0, QUEUES), "the daemon's queues are all detached"
        net.disable_ipv6(dev)
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", dev], check=True)

        xml = os.path.join(tmpdir_short, "domain.xml")
        with open(xml, "w") as f:
            f.write(domain_xml(dom, dev, guest, serial))
        libvirtd.virsh("define", xml)
        defined = True
        libvirtd.virsh("start", dom)
        qemu = libvirtd.qemu_pid(dom)
        assert qemu, "libvirt wrote no pid file for the domain"

        # A guest that stops early (QEMU gone) ends the wait at once.
        ready = net.settle(lambda: ready_line(serial) or not net.alive(qemu), 120, every=0.2)
        assert isinstance(ready, str) and net.alive(qemu), \
            f"the guest did not boot (domain {libvirtd.domain_state(dom)!r}):\n" + why()
        # The guest's ethtool enabled all 4 queue pairs (sysfs has a dir per active queue).
        assert {f"rxq={QUEUES}", f"txq={QUEUES}"} <= set(ready.split()), ready
        assert not [l for l in net.read_lines(serial) if l.startswith("MQT-ERROR")], why()

        # libvirt opened the device by name 4 times: 4 queues that are not the daemon's.
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}").json()["foreign_queues"] == QUEUES,
                          30, every=0.2), api.get(f"/v1/devices/{dev}").json()
        device = api.get(f"/v1/devices/{dev}").json()
        assert device["queue_count"] == QUEUES and device["enabled_queues"] == 0
        assert device["consumer"] == "external" and "split" not in device.get("state_reason", ""), device
        assert device["vnet_hdr_size"] == 12, "QEMU set virtio 1.0's header size (the device's, not a queue's)"
        assert not any(q["enabled"] or q["leased"] for q in device["queues"])
        # QEMU detaches the queues of the pairs the guest did not enable: all 4 are attached.
        assert net.queue_counts(dev) == (QUEUES, QUEUES), "libvirt's 4 attached, the daemon's 4 detached"

        # The guest pings the host...
        assert net.settle(lambda: guest_pings(serial)[0] >= PINGS, 60, every=0.2), \
            "timed out waiting for the guest's pings:\n" + why()
        # ...and the host pings the guest.
        r = net.sh("ping", "-n", "-c", str(PINGS), "-i", "0.2", "-W", "5", "-I", dev, GUEST_IP, check=False)
        assert r.returncode == 0 and f"{PINGS} received" in r.stdout, r.stdout + r.stderr

        # Many flows into the tap: they go to libvirt's queues (the kernel counts them as the
        # tap's tx) and not to the daemon's, which are detached.
        stats = lambda: api.get(f"/v1/devices/{dev}/stats").json()["total"]
        before, k0 = stats(), net.kernel_stats(dev)
        send_udp_flows(FLOWS)
        assert net.settle(lambda: net.kernel_stats(dev)["tx_packets"] - k0["tx_packets"] >= FLOWS, 10), \
            (k0, net.kernel_stats(dev))
        after = stats()
        assert (after["rx_packets"], after["tx_packets"]) == (before["rx_packets"], before["tx_packets"]), \
            "the daemon read or wrote frames of a device it does not consume"

        answered, lost = guest_pings(serial)
        assert lost == 0 and answered >= PINGS, f"the guest lost {lost} of {answered + lost} pings"

        libvirtd.virsh("destroy", dom)
        assert libvirtd.domain_state(dom) == "shut off"
        assert net.settle(lambda: not net.alive(qemu), 30), f"QEMU {qemu} is still there"
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}").json()["foreign_queues"] == 0, 30, every=0.2), \
            api.get(f"/v1/devices/{dev}").json()
        # The device outlives the domain, as it was.
        assert net.exists(dev)
        device = api.get(f"/v1/devices/{dev}").json()
        assert device["state"] == "active" and device["queue_count"] == QUEUES and device["enabled_queues"] == 0
        assert net.queue_counts(dev) == (0, QUEUES)
        # The settings QEMU changed are put back as the API set them.
        assert net.settle(lambda: api.get(f"/v1/devices/{dev}").json()["vnet_hdr_size"] == 10, 10)
        assert api.get(f"/v1/devices/{dev}").json()["settings_differ"] == []

        libvirtd.virsh("undefine", dom)
        defined = False
        assert libvirtd.domains() == []
        assert api.delete(f"/v1/devices/{dev}").status == 204
        assert net.settle(lambda: not net.exists(dev))
    finally:
        if defined:
            libvirtd.virsh("destroy", dom, check=False)
            libvirtd.virsh("undefine", dom, check=False)
        rc = d.stop()
        net.delete_link(dev)
        assert rc == 0, "\n".join(d.log[-20:])
        assert had_virbr0 or not net.exists("virbr0"), "something created virbr0"
