"""A smoke run of the benchmark tools (seconds): the generator's frames reach the reference
receiver's queues, and every frame is accounted for. Timing is never asserted here."""
import json
import os
import platform
import signal
import subprocess

import pytest

import net
from conftest import unique_name
from mqtapd_client import ROOT

GEN = os.path.join(ROOT, "bench", "gen")
REF = os.path.join(ROOT, "bench", "ref")
URING = os.path.join(ROOT, "bench", "uring")
NEW_ENOUGH = tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 7)


@pytest.mark.parametrize("receiver", [
    [REF],
    [REF, "--mode", "epoll"],
    pytest.param([URING], marks=pytest.mark.skipif(not NEW_ENOUGH, reason="io_uring multishot reads need Linux >= 6.7")),
], ids=["ref", "ref-epoll", "uring"])
def test_generator_and_receivers(receiver):
    name = unique_name("b")
    ref = subprocess.Popen(receiver + ["--name", name, "--queues", "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert ref.stdout.readline().strip() == "ready"
        out = subprocess.run([GEN, "--dev", name, "--dst", "02:00:00:00:00:02", "--count", "20000", "--size", "64",
                              "--pps", "400000"], capture_output=True, text=True, check=True).stdout
        g = json.loads(out)
        assert g["sent"] == 20000
        # Frames the device refused (its queue was stopped) are the kernel's tx_dropped and
        # are not in `sent`: every frame is either read by a queue or counted as dropped.
        assert net.settle(lambda: net.kernel_stats(name)["tx_packets"] == 20000), net.kernel_stats(name)
        assert net.kernel_stats(name)["tx_dropped"] == g["refused"], (net.kernel_stats(name), g)
        tx = net.kernel_stats(name)["tx_packets"]
    finally:
        ref.send_signal(signal.SIGTERM)
    counts = json.loads(ref.stdout.readline())["queues"]
    assert ref.wait(10) == 0
    assert sum(counts) == tx
    assert all(c > 0 for c in counts), counts
    # io_uring drops its file references asynchronously after exit: the device goes soon after.
    assert net.settle(lambda: not net.exists(name)), name


def test_generator_refuses_bad_arguments():
    r = subprocess.run([GEN, "--size", "10"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run([REF, "--name", unique_name("b"), "--queues", "1", "--mode", "poll"], capture_output=True, text=True)
    assert r.returncode == 2 and "--mode" in r.stderr


def test_reference_forwarder():
    """bench/fwd: what goes into A comes out of B, frame for frame (it counts without vnet headers)."""
    fwd = os.path.join(ROOT, "bench", "fwd")
    a, b = unique_name("fa"), unique_name("fb")
    p = subprocess.Popen([fwd, "--a", a, "--b", b, "--queues", "2", "--offload"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        for dev in (a, b):
            net.disable_ipv6(dev)
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        mac = open(f"/sys/class/net/{b}/address").read().strip()
        sent = net.send_frames(a, mac, 500)
        assert net.settle(lambda: net.kernel_stats(b)["rx_packets"] >= sent), (sent, net.kernel_stats(b))
        tx = net.kernel_stats(a)["tx_packets"]
    finally:
        p.send_signal(signal.SIGTERM)
    out = json.loads(p.stdout.readline())
    assert p.wait(10) == 0
    assert out["a_to_b"]["frames"] == tx, out
    assert net.settle(lambda: not net.exists(a) and not net.exists(b))
