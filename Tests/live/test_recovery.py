"""Crash safety and recovery with real processes and devices: kill -9 and restart, state-file
faults, devices deleted behind the back, races, fd exhaustion, single instance."""
import json
import os
import signal
import subprocess
import threading

import pytest

import net
from conftest import BIN, Daemon, unique_name


def state_path(tmp):
    return os.path.join(tmp, "state", "state.json")


def shape(device):
    """What must survive a restart (counters and `since` restart by design)."""
    return {
        "name": device["name"], "type": device["type"], "max_queues": device["max_queues"],
        "persist": device["persist"], "mode": device["mode"], "mtu": device["mtu"], "up": device["up"],
        "queues": [(q["id"], q["enabled"]) for q in device["queues"]], "state": device["state"],
    }


def test_kill_9_and_restart_brings_everything_back(tmpdir_short):
    p, n = unique_name("p"), unique_name("n")
    d = Daemon(tmpdir_short)
    try:
        api = d.unix
        assert api.put("/v1/limits", {"max_queues": 64}).status == 200
        assert api.post("/v1/devices", {"name": p, "queues": 4, "persist": True, "max_queues": 8,
                                        "mode": "echo", "up": False}).status == 201
        api.patch(f"/v1/devices/{p}/queues/2", {"enabled": False})
        assert api.post("/v1/devices", {"name": n, "queues": 3, "mtu": 9000}).status == 201
        api.delete(f"/v1/devices/{n}/queues/1")
        before = {x["name"]: shape(x) for x in api.get("/v1/devices").json()["devices"]}
        d.stop(signal.SIGKILL)
        # The persistent device outlived the process, queue-less; the other went with its fds.
        assert net.exists(p) and net.kernel_queue_count(p) == 0
        assert not net.exists(n)

        d = Daemon(tmpdir_short)
        api = d.unix
        after = {x["name"]: shape(x) for x in api.get("/v1/devices").json()["devices"]}
        assert after == before
        assert api.get("/v1/limits").json()["max_queues"] == 64
        assert net.kernel_queue_count(p) == 3 and net.kernel_queue_count(n) == 2  # numqueues: attached only
        details = subprocess.run(["ip", "-d", "link", "show", "dev", p], capture_output=True, text=True).stdout
        assert "numdisabled 1" in details and "persist on" in details
        assert int(open(f"/sys/class/net/{n}/mtu").read()) == 9000
        for q in api.get(f"/v1/devices/{p}").json()["queues"]:
            assert q["counters"]["rx_packets"] == 0 and q["since"]

        # Traffic is counted again, on the restored queue ids.
        net.disable_ipv6(n)
        mac = api.get(f"/v1/devices/{n}").json()["mac"]
        sent = net.send_frames(n, mac, 4000)
        assert net.settle(lambda: (lambda s: s["total"]["rx_packets"] + s["kernel"]["tx_dropped"] >= sent)(
            api.get(f"/v1/devices/{n}/stats").json()))
        s = api.get(f"/v1/devices/{n}/stats").json()
        assert [q["id"] for q in s["queues"]] == [0, 2]
        assert all(q["rx_packets"] > 0 for q in s["queues"])
        assert api.delete(f"/v1/devices/{p}").status == 204
        assert not net.exists(p)
    finally:
        d.stop()
        net.delete_link(p)
        net.delete_link(n)


def test_flag_mismatch_is_reported_and_left_untouched(tmpdir_short):
    bad, good = unique_name("f"), unique_name("g")
    d = Daemon(tmpdir_short)
    try:
        d.unix.post("/v1/devices", {"name": bad, "queues": 2, "persist": True})
        d.unix.post("/v1/devices", {"name": good, "queues": 2, "persist": True})
        d.stop(signal.SIGKILL)
        # Someone re-creates the device with other flags (vnet_hdr on) while mqtapd is down.
        subprocess.run(["ip", "link", "del", bad], check=True)
        subprocess.run(["ip", "tuntap", "add", "dev", bad, "mode", "tap", "multi_queue", "vnet_hdr"], check=True)
        flags_before = open(f"/sys/class/net/{bad}/tun_flags").read()

        d = Daemon(tmpdir_short)
        dev = d.unix.get(f"/v1/devices/{bad}").json()
        assert dev["state"] == "conflict" and "tun_flags" in dev["state_reason"]
        assert dev["queue_count"] == 0
        assert open(f"/sys/class/net/{bad}/tun_flags").read() == flags_before
        assert net.kernel_queue_count(bad) == 0
        r = d.unix.post(f"/v1/devices/{bad}/queues")
        assert r.status == 409 and r.code == "device_not_active", r
        assert any("device not restored" in line and bad in line for line in d.log)
        assert d.unix.get(f"/v1/devices/{good}").json()["state"] == "active"
        assert net.kernel_queue_count(good) == 2
        # DELETE forgets it without touching the kernel's device.
        assert d.unix.delete(f"/v1/devices/{bad}").status == 204
        assert net.exists(bad)
        d.unix.delete(f"/v1/devices/{good}")
    finally:
        d.stop()
        net.delete_link(bad)
        net.delete_link(good)


def test_corrupt_state_file_is_reported_and_kept_aside(tmpdir_short):
    os.makedirs(os.path.join(tmpdir_short, "state"))
    with open(state_path(tmpdir_short), "w") as f:
        f.write('{"version": 1, "devices": [\n')
    d = Daemon(tmpdir_short, tcp=False)
    try:
        assert d.unix.get("/v1/devices").json()["devices"] == []
        assert any("level=error" in line and "state file is corrupt" in line for line in d.log)
        aside = [f for f in os.listdir(os.path.join(tmpdir_short, "state")) if f.startswith("state.json.corrupt-")]
        assert len(aside) == 1
        assert open(os.path.join(tmpdir_short, "state", aside[0])).read() == '{"version": 1, "devices": [\n'
    finally:
        assert d.stop() == 0


def test_deleted_behind_the_back_is_not_recreated(tmpdir_short):
    a = unique_name("b")
    d = Daemon(tmpdir_short)
    try:
        d.unix.post("/v1/devices", {"name": a, "queues": 2})
        subprocess.run(["ip", "link", "del", a], check=True)
        assert net.settle(lambda: d.unix.get("/v1/limits").json()["devices"] == 0)
        assert net.settle(lambda: a not in open(state_path(tmpdir_short)).read())
        d.stop(signal.SIGKILL)
        d = Daemon(tmpdir_short)
        assert d.unix.get(f"/v1/devices/{a}").status == 404
        assert not net.exists(a)
        assert d.unix.post("/v1/devices", {"name": a}).status == 201
        d.unix.delete(f"/v1/devices/{a}")
    finally:
        d.stop()
        net.delete_link(a)


def test_concurrent_creates_and_adds_are_linearizable(daemon, api):
    n = unique_name("r")
    results = []

    def create():
        results.append(api.post("/v1/devices", {"name": n, "queues": 2, "max_queues": 10}).status)

    threads = [threading.Thread(target=create) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        assert sorted(results) == [201] + [409] * 15
        adds = []

        def add():
            adds.append(api.post(f"/v1/devices/{n}/queues").status)

        threads = [threading.Thread(target=add) for _ in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(adds) == [201] * 8 + [409] * 8
        assert [q["id"] for q in api.get(f"/v1/devices/{n}").json()["queues"]] == list(range(10))
        assert net.kernel_queue_count(n) == 10
        # A delete racing adds leaves a consistent device or none.
        ops = []
        threads = [threading.Thread(target=lambda: ops.append(api.delete(f"/v1/devices/{n}").status))] + [
            threading.Thread(target=lambda: ops.append(api.delete(f"/v1/devices/{n}/queues/9").status))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert 204 in ops
        assert not net.exists(n)
    finally:
        net.delete_link(n)


def test_1000_cycles_leave_no_fd_and_no_device(daemon, api):
    n = unique_name("c")
    api.get("/v1/health")
    fds = net.open_fds(daemon.pid)
    for i in range(1000):
        assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
        assert api.post(f"/v1/devices/{n}/queues", {"count": 2}).status == 201
        assert api.delete(f"/v1/devices/{n}/queues/{i % 4}").status == 204
        assert api.delete(f"/v1/devices/{n}").status == 204
    assert not net.exists(n)
    assert net.settle(lambda: net.open_fds(daemon.pid) <= fds), (net.open_fds(daemon.pid), fds)
    assert api.get("/v1/limits").json()["queues_in_use"] == 0


def test_fd_exhaustion_is_503_and_leaves_nothing(tmpdir_short):
    # Soft 48, hard 96: the daemon raises its soft limit to the hard one at start, and its
    # own fds (~25) leave room for some queues, not for 128.
    d = Daemon(tmpdir_short, "--workers", "1", prefix=["prlimit", "--nofile=48:96"], tcp=False)
    a, b = unique_name("x"), unique_name("x")
    try:
        limits = d.unix.get("/v1/limits").json()
        assert limits["open_files_limit"] == 96
        fds = net.open_fds(d.pid)
        r = d.unix.post("/v1/devices", {"name": a, "queues": 128})
        assert r.status == 503 and r.code == "resource_exhausted" and r.json()["error"]["errno"] == "EMFILE", r
        assert not net.exists(a)
        assert net.settle(lambda: net.open_fds(d.pid) <= fds)
        r = d.unix.post("/v1/devices", {"name": b, "queues": 4})
        assert r.status == 201
        d.unix.delete(f"/v1/devices/{b}")
    finally:
        assert d.stop() == 0
        net.delete_link(a)
        net.delete_link(b)


def test_a_second_instance_on_the_same_state_dir_refuses(tmpdir_short):
    first = Daemon(tmpdir_short, tcp=False)
    try:
        other = os.path.join(tmpdir_short, "other.sock")
        r = subprocess.run([BIN, "--listen", f"unix:{other}", "--state-dir", os.path.join(tmpdir_short, "state")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert os.path.join(tmpdir_short, "state", "lock") in r.stderr and "another mqtapd instance" in r.stderr
        assert not os.path.exists(other)
        assert first.unix.get("/v1/health").status == 200
    finally:
        assert first.stop() == 0


def test_a_state_file_entry_the_api_would_refuse_is_set_aside(tmpdir_short):
    """The state file is checked by the API's rules: a device forwarding to itself (or with a
    name the API refuses) is not made; it is kept as `failed` with the reason, logged, and
    the other devices come back. An external device comes back external."""
    loop, ok = unique_name("s"), unique_name("x")
    d = Daemon(tmpdir_short, tcp=False)
    try:
        assert d.unix.post("/v1/devices", {"name": loop, "queues": 1}).status == 201
        assert d.unix.post("/v1/devices", {"name": ok, "queues": 2, "mode": "external"}).status == 201
        assert d.stop() == 0
        with open(state_path(tmpdir_short)) as f:
            state = json.load(f)
        for dev in state["devices"]:
            if dev["name"] == loop:
                dev["mode"], dev["peer"] = "forward", loop
        with open(state_path(tmpdir_short), "w") as f:
            json.dump(state, f)
        d = Daemon(tmpdir_short, tcp=False)
        dev = d.unix.get(f"/v1/devices/{loop}").json()
        assert dev["state"] == "failed" and "cannot forward to itself" in dev["state_reason"], dev
        assert not net.exists(loop), "nothing was made for it"
        assert any("device not restored" in line and loop in line for line in d.log)
        dev = d.unix.get(f"/v1/devices/{ok}").json()
        assert dev["state"] == "active" and dev["mode"] == "external" and dev["enabled_queues"] == 0, dev
        assert d.unix.delete(f"/v1/devices/{loop}").status == 204
        assert d.unix.delete(f"/v1/devices/{ok}").status == 204
    finally:
        d.stop()
        net.delete_link(loop)
        net.delete_link(ok)
