"""Forward mode end to end: two taps made by the daemon, each moved into a network namespace
of its own, forwarding to each other with GSO offloads. Ping and iperf3 TCP through the wire;
every counter reconciles exactly with both kernels' device counters; churn under traffic."""
import json
import os
import subprocess
import threading
import time

import net
from net import sh
from conftest import Daemon, PREFIX, unique_name

A_IP, B_IP = "198.18.0.1", "198.18.0.2"


def total(api, dev):
    return api.get(f"/v1/devices/{dev}/stats").json()["total"]


def move(dev, ns, ip):
    sh("ip", "link", "set", dev, "netns", ns)
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
    sh("ip", "-n", ns, "link", "set", dev, "up")


def iperf(nsa, nsb, seconds, streams=1):
    server = subprocess.Popen(["ip", "netns", "exec", nsb, "iperf3", "-s", "-1", "-B", B_IP],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if sh("ip", "netns", "exec", nsb, "ss", "-Hltn", "sport = :5201").stdout.strip():
                break
            time.sleep(0.1)
        r = sh("ip", "netns", "exec", nsa, "iperf3", "-c", B_IP, "-t", str(seconds), "-P", str(streams), "-J", check=False)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9 if r.returncode == 0 else None
    finally:
        server.kill()
        server.wait()


def reconcile(api, a, b, nsa, nsb, base):
    """The deltas since `base` agree exactly: what each daemon side counted and each kernel."""
    ta, tb = total(api, a), total(api, b)
    ka, kb = net.kernel_stats(a, nsa), net.kernel_stats(b, nsb)
    d = lambda cur, key, which: cur[key] - base[which][key]
    return (d(ta, "rx_packets", "ta") == d(ka, "tx_packets", "ka")          # a's queues read = a kernel sent
            and d(ta, "rx_bytes", "ta") == d(ka, "tx_bytes", "ka")
            and d(tb, "tx_packets", "tb") == d(kb, "rx_packets", "kb")      # written into b = b kernel received
            and d(tb, "tx_bytes", "tb") == d(kb, "rx_bytes", "kb")
            and d(ta, "rx_packets", "ta") == d(tb, "tx_packets", "tb") + d(ta, "dropped", "ta")
            and d(tb, "rx_packets", "tb") == d(ta, "tx_packets", "ta") + d(tb, "dropped", "tb"))


def snapshot(api, a, b, nsa, nsb):
    return {"ta": total(api, a), "tb": total(api, b), "ka": net.kernel_stats(a, nsa), "kb": net.kernel_stats(b, nsb)}


def test_a_forwarded_wire_between_two_namespaces(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    api = d.unix
    a, b = unique_name("fa"), unique_name("fb")
    nsa, nsb = f"{PREFIX}na", f"{PREFIX}nb"
    try:
        sh("ip", "netns", "add", nsa)
        sh("ip", "netns", "add", nsb)
        # Fixed MACs: b is made again below, and a's neighbour entry must still be right.
        spec = {"queues": 2, "vnet_hdr": True, "offload": True, "up": False}
        assert api.post("/v1/devices", {"name": b, **spec, "mac": "02:00:00:00:0b:01"}).status == 201
        r = api.post("/v1/devices", {"name": a, **spec, "mac": "02:00:00:00:0a:01", "mode": "forward", "peer": b})
        assert r.status == 201 and r.json()["peer_state"] == "active", r
        assert set(r.json()["offloads"]) >= {"csum", "tso4", "tso6"}
        assert api.patch(f"/v1/devices/{b}", {"mode": "forward", "peer": a}).json()["peer"] == a
        move(a, nsa, A_IP)
        move(b, nsb, B_IP)
        assert sh("ip", "netns", "exec", nsa, "ping", "-c", "3", "-i", "0.2", "-w", "30", B_IP, check=False).returncode == 0
        assert sh("ip", "netns", "exec", nsb, "ping", "-c", "3", "-i", "0.2", "-w", "30", A_IP, check=False).returncode == 0
        # Each device shows where it is: the namespace's inode and its name under /run/netns.
        for dev, ns in ((a, nsa), (b, nsb)):
            info = api.get(f"/v1/devices/{dev}").json()
            assert info["netns"] == {"inode": os.stat(f"/run/netns/{ns}").st_ino, "name": ns, "own": False}, info
            assert info["kernel_name"] == dev and info["foreign_queues"] == 0
            assert info["ifindex"] == int(sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/ifindex").stdout)
        base = snapshot(api, a, b, nsa, nsb)
        gbps = iperf(nsa, nsb, 3)
        assert gbps and gbps > 0.05, gbps
        assert net.settle(lambda: reconcile(api, a, b, nsa, nsb, base), every=0.1, steady=0.3), (snapshot(api, a, b, nsa, nsb), base)
        ta = total(api, a)
        frames = ta["rx_packets"] - base["ta"]["rx_packets"]
        assert (ta["rx_bytes"] - base["ta"]["rx_bytes"]) / frames > 1500, "GSO super-frames pass through whole"
        assert ta["dropped"] == 0
        # The daemon reads and sets each moved device where it is: its kernel counters are the
        # namespace's, and a PATCH never touches what took its name here.
        assert net.settle(lambda: api.get(f"/v1/devices/{a}/stats").json()["kernel"]["tx_packets"]
                          == net.kernel_stats(a, nsa)["tx_packets"], every=0.1, steady=0.3)
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", f"{a}p")
        try:
            assert api.patch(f"/v1/devices/{a}", {"mtu": 9000}).json()["mtu"] == 9000
            assert "mtu 9000" in sh("ip", "-n", nsa, "link", "show", a).stdout
            assert "mtu 1500" in sh("ip", "link", "show", a).stdout, "the stranger that took the name is untouched"
            assert api.patch(f"/v1/devices/{a}", {"mtu": 1500}).status == 200
        finally:
            sh("ip", "link", "del", a, check=False)

        # Churn under traffic: modes, queues on both sides, the peer deleted and made again.
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("gbps", iperf(nsa, nsb, 6, 2)))
        t.start()
        time.sleep(1)
        assert api.patch(f"/v1/devices/{a}", {"mode": "sink"}).status == 200
        time.sleep(0.3)
        assert api.patch(f"/v1/devices/{a}", {"mode": "forward", "peer": b}).status == 200
        for dev in (a, b):
            added = api.post(f"/v1/devices/{dev}/queues", {"count": 2}).json()["queues"]
            time.sleep(0.2)
            for q in added:
                assert api.delete(f"/v1/devices/{dev}/queues/{q['id']}").status == 204
        dropped_before = total(api, a)["dropped"]
        assert api.delete(f"/v1/devices/{b}").status == 204
        assert net.settle(lambda: api.get(f"/v1/devices/{a}").json()["peer_state"] == "missing")
        # Frames sent now have nowhere to go (the iperf may be between its streams: a ping
        # makes sure some come).
        sh("ip", "netns", "exec", nsa, "ping", "-c", "3", "-i", "0.2", "-W", "1", B_IP, check=False)
        assert net.settle(lambda: total(api, a)["dropped"] > dropped_before), "frames with no peer are dropped and counted"
        assert api.post("/v1/devices", {"name": b, **spec, "mac": "02:00:00:00:0b:01", "mode": "forward",
                                         "peer": a}).status == 201
        move(b, nsb, B_IP)
        assert api.get(f"/v1/devices/{a}").json()["peer_state"] == "active"
        t.join(60)
        # Forwarding resumes, and the counters reconcile again.
        assert sh("ip", "netns", "exec", nsa, "ping", "-c", "3", "-i", "0.2", "-w", "30", B_IP, check=False).returncode == 0
        base = snapshot(api, a, b, nsa, nsb)
        assert (iperf(nsa, nsb, 2) or 0) > 0.05
        assert net.settle(lambda: reconcile(api, a, b, nsa, nsb, base), every=0.1, steady=0.3), (snapshot(api, a, b, nsa, nsb), base)
        assert api.delete(f"/v1/devices/{a}").status == 204
        assert api.delete(f"/v1/devices/{b}").status == 204
    finally:
        assert d.stop() == 0
        for ns in (nsa, nsb):
            sh("ip", "netns", "del", ns, check=False)
        net.delete_link(a)
        net.delete_link(b)
