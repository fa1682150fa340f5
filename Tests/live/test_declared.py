"""Declared queue counts on real taps: PATCH queues / enabled_queues, checked against the
kernel's numqueues and numdisabled after each step."""
import threading

import lease_client
import net


def test_up_and_down_with_the_attached_count(api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
    d = api.patch(f"/v1/devices/{n}", {"queues": 8, "enabled_queues": 4}).json()
    assert d["queue_count"] == 8 and d["enabled_queues"] == 4
    assert [q["enabled"] for q in d["queues"]] == [True] * 4 + [False] * 4
    assert net.queue_counts(n) == (4, 4)
    d = api.patch(f"/v1/devices/{n}", {"enabled_queues": 6}).json()
    assert net.queue_counts(n) == (6, 2) and d["enabled_queues"] == 6
    d = api.patch(f"/v1/devices/{n}", {"queues": 3}).json()
    assert [q["id"] for q in d["queues"]] == [0, 1, 2] and net.queue_counts(n) == (3, 0)
    d = api.patch(f"/v1/devices/{n}", {"queues": 3, "enabled_queues": 1}).json()
    assert net.queue_counts(n) == (1, 2)
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_refusals_at_the_limit_and_with_a_lease_change_nothing(daemon, api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 4, "max_queues": 6}).status == 201
    r = api.patch(f"/v1/devices/{n}", {"queues": 7})
    assert r.status == 409 and r.code == "queue_limit_exceeded", r
    r = api.patch(f"/v1/devices/{n}", {"queues": 5, "enabled_queues": 6})
    assert r.status == 409 and r.code == "not_enough_queues" and r.json()["error"]["field"] == "enabled_queues", r
    for bad in ({"queues": 0}, {"queues": 257}, {"enabled_queues": -1}, {"enabled_queues": 257}):
        r = api.patch(f"/v1/devices/{n}", bad)
        assert r.status == 400 and r.code == "invalid_field", (bad, r)
    assert net.queue_counts(n) == (4, 0)
    # At the limit exactly: fine.
    assert api.patch(f"/v1/devices/{n}", {"queues": 6}).json()["queue_count"] == 6
    assert net.queue_counts(n) == (6, 0)
    lease = lease_client.take(daemon.socket, n, {"queues": [2, 3, 4, 5]})
    try:
        # The lease takes the device: queues 0 and 1 are held detached.
        assert net.queue_counts(n) == (4, 2)
        r = api.patch(f"/v1/devices/{n}", {"queues": 3})
        assert r.status == 409 and r.code == "queue_leased", r
        assert net.queue_counts(n) == (4, 2)
        # Leased queues are skipped: the highest ids that are not leased go (1, then 0).
        d = api.patch(f"/v1/devices/{n}", {"queues": 5}).json()
        assert [q["id"] for q in d["queues"]] == [0, 2, 3, 4, 5]
        assert net.queue_counts(n) == (4, 1)
    finally:
        lease.close()
    assert net.settle(lambda: not any(q["leased"] for q in api.get(f"/v1/devices/{n}").json()["queues"]))
    assert net.settle(lambda: net.queue_counts(n) == (5, 0)), "the lease's end gives queue 0 back as the API set it"
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_concurrent_with_adds_the_kernel_agrees(api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 1}).status == 201
    errors = []

    def declare():
        for k in (16, 4, 12, 2, 20):
            r = api.patch(f"/v1/devices/{n}", {"queues": k, "enabled_queues": k // 2})
            if r.status not in (200, 409):
                errors.append(r)

    def add():
        for _ in range(10):
            r = api.post(f"/v1/devices/{n}/queues", {"count": 2})
            if r.status not in (201, 409):
                errors.append(r)

    threads = [threading.Thread(target=declare), threading.Thread(target=add)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    d = api.get(f"/v1/devices/{n}").json()
    assert net.queue_counts(n) == (d["enabled_queues"], d["queue_count"] - d["enabled_queues"])
    assert api.delete(f"/v1/devices/{n}").status == 204
