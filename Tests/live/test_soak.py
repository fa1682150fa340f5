"""Soak: traffic on several devices while a client churns queues and devices; at the end
every counter reconciles with the kernel's and nothing leaked. 30 s in the regular test
command; `make soak` runs it for 5 minutes (MQTAPD_SOAK_SECONDS)."""
import os
import random
import threading
import time

import net
from conftest import Daemon, unique_name

SECONDS = float(os.environ.get("MQTAPD_SOAK_SECONDS", "30"))


def test_soak(tmpdir_short):
    d = Daemon(tmpdir_short, "--workers", "2")
    api = d.unix
    steady = [unique_name("k") for _ in range(3)]
    churned = unique_name("j")
    stop = threading.Event()
    sent = {n: 0 for n in steady}
    removals = {n: 0 for n in steady}
    errors = []
    try:
        fds = net.open_fds(d.pid)
        macs = {}
        base = {}
        for n in steady:
            dev = api.post("/v1/devices", {"name": n, "queues": 4, "max_queues": 16, "up": False}).json()
            net.disable_ipv6(n)
            api.patch(f"/v1/devices/{n}", {"up": True})
            macs[n] = dev["mac"]
            base[n] = net.kernel_stats(n)

        def traffic(n):
            while not stop.is_set():
                sent[n] += net.send_frames(n, macs[n], 500)
                time.sleep(0.005)

        def churn():
            rng = random.Random(7)
            while not stop.is_set():
                try:
                    n = rng.choice(steady)
                    queues = api.get(f"/v1/devices/{n}/queues").json()["queues"]
                    if len(queues) > 2 and rng.random() < 0.5:
                        q = rng.choice(queues)["id"]
                        # The device's total keeps what a removed queue counted.
                        assert api.delete(f"/v1/devices/{n}/queues/{q}").status == 204
                        removals[n] += 1
                    elif len(queues) < 8:
                        assert api.post(f"/v1/devices/{n}/queues").status == 201
                    q = rng.choice(api.get(f"/v1/devices/{n}/queues").json()["queues"])
                    if len(queues) > 1:
                        api.patch(f"/v1/devices/{n}/queues/{q['id']}", {"enabled": not q["enabled"]})
                    assert api.post("/v1/devices", {"name": churned, "queues": rng.randint(1, 8)}).status == 201
                    api.get("/metrics")
                    assert api.delete(f"/v1/devices/{churned}").status == 204
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))
                    return

        threads = [threading.Thread(target=traffic, args=(n,)) for n in steady] + [threading.Thread(target=churn)]
        [t.start() for t in threads]
        time.sleep(SECONDS)
        stop.set()
        [t.join() for t in threads]
        assert not errors, errors

        for n in steady:
            # Re-attach everything so every frame still in a ring gets read and counted.
            for q in api.get(f"/v1/devices/{n}/queues").json()["queues"]:
                if not q["enabled"]:
                    api.patch(f"/v1/devices/{n}/queues/{q['id']}", {"enabled": True})

            def totals():
                s = api.get(f"/v1/devices/{n}/stats").json()
                k = net.kernel_stats(n)
                return s["total"]["rx_packets"], k["tx_packets"] - base[n]["tx_packets"], k["tx_dropped"] - base[n]["tx_dropped"]

            # Every frame the kernel transmitted was read and counted by exactly one queue, and
            # the total keeps the removed queues' counts.
            assert net.settle(lambda: (lambda rx, tx, _: rx == tx)(*totals())), (n, totals())
            rx, tx, dropped = totals()
            assert rx == tx
            # What the kernel took is transmitted, dropped (counted), or was in the ring of a
            # queue when it was removed (at most txqueuelen each time).
            assert 0 <= sent[n] - tx - dropped <= 1000 * removals[n], (n, sent[n], tx, dropped, removals[n])
            assert rx > 0
        for n in steady:
            assert api.delete(f"/v1/devices/{n}").status == 204
        assert net.settle(lambda: net.open_fds(d.pid) <= fds), (net.open_fds(d.pid), fds)
        assert api.get("/v1/limits").json()["devices"] == 0
    finally:
        stop.set()
        assert d.stop() == 0
        for n in steady + [churned]:
            net.delete_link(n)
    assert not any(net.exists(n) for n in steady + [churned])
