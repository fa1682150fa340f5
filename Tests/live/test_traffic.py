"""Traffic through the API: per-queue and total counters exact against the kernel's."""
import net


settle = net.settle


def test_counters_exact_against_the_kernel(api, name):
    n = name()
    d = api.post("/v1/devices", {"name": n, "queues": 4, "up": False}).json()
    net.disable_ipv6(n)
    api.patch(f"/v1/devices/{n}", {"up": True})
    before = net.kernel_stats(n)
    sent = net.send_frames(n, d["mac"], 20000)

    def stats():
        return api.get(f"/v1/devices/{n}/stats").json()

    def accounted():
        s = stats()
        return s["total"]["rx_packets"] + (s["kernel"]["tx_dropped"] - before["tx_dropped"]) == sent

    assert settle(accounted), stats()
    s = stats()
    assert s["total"]["rx_packets"] == s["kernel"]["tx_packets"] - before["tx_packets"]
    assert s["total"]["rx_packets"] == sum(q["rx_packets"] for q in s["queues"])
    assert s["total"]["rx_bytes"] == 60 * s["total"]["rx_packets"]
    assert all(q["rx_packets"] > 0 for q in s["queues"]), s["queues"]
    # The device view carries the same per-queue numbers.
    per_queue = {q["id"]: q["counters"]["rx_packets"] for q in api.get(f"/v1/devices/{n}").json()["queues"]}
    assert per_queue == {q["id"]: q["rx_packets"] for q in s["queues"]}
    api.delete(f"/v1/devices/{n}")


def test_echo_through_the_api(api, name):
    n = name()
    d = api.post("/v1/devices", {"name": n, "queues": 2, "up": False, "mode": "echo"}).json()
    net.disable_ipv6(n)
    api.patch(f"/v1/devices/{n}", {"up": True})
    before = net.kernel_stats(n)
    sent = net.send_frames(n, d["mac"], 5000)

    def done():
        s = api.get(f"/v1/devices/{n}/stats").json()
        return (s["total"]["rx_packets"] + s["kernel"]["tx_dropped"] - before["tx_dropped"] == sent
                and s["kernel"]["rx_packets"] - before["rx_packets"] == s["total"]["tx_packets"])

    assert settle(done)
    s = api.get(f"/v1/devices/{n}/stats").json()
    assert s["total"]["tx_packets"] == s["total"]["rx_packets"]
    api.delete(f"/v1/devices/{n}")
