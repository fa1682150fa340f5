"""/metrics as Prometheus sees it: promtool accepts the exposition; the kernel's device
counters, a device info metric with its state, and the standard process_* metrics are there."""
import os
import re
import shutil
import subprocess

import net
from mqtapd_client import ROOT


def test_metrics_pass_promtool_and_carry_what_people_expect(api, name):
    n = name()
    assert api.post("/v1/devices", {"name": n, "queues": 2}).status == 201
    net.disable_ipv6(n)
    mac = api.get(f"/v1/devices/{n}").json()["mac"]
    net.send_frames(n, mac, 50)
    # Settled: what the kernel sent into the device is what the queues read.
    rx = lambda: api.get(f"/v1/devices/{n}/stats").json()["total"]["rx_packets"]
    assert net.settle(lambda: rx() == net.kernel_stats(n)["tx_packets"] > 0 and rx() == net.kernel_stats(n)["tx_packets"])
    sent = net.kernel_stats(n)["tx_packets"]
    r = api.get("/metrics")
    assert r.status == 200
    text = r.body.decode()
    # Debian's prometheus package ships promtool; `scripts/install-deps.sh --test` takes it out of
    # the package into .build-tools/bin rather than install the server.
    promtool = shutil.which("promtool") or shutil.which("promtool", path=os.path.join(ROOT, ".build-tools", "bin"))
    assert promtool, "no promtool on PATH or in .build-tools/bin: run scripts/install-deps.sh --test"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f'mqtapd_device_kernel_tx_packets_total{{device="{n}"}} {sent}' in text
    assert re.search(rf'mqtapd_device_info{{device="{n}",state="active",type="tap",persist="false",mode="sink"}} 1', text)
    for m in ("process_open_fds", "process_max_fds", "process_cpu_seconds_total", "process_resident_memory_bytes",
              "process_start_time_seconds"):
        assert re.search(rf"^{m} \S+$", text, re.M), m
    assert "mqtapd_open_files" not in text
    assert "# HELP mqtapd_queue_rx_packets_total Frames the daemon read from the queue: what the kernel sent" in text
    assert api.delete(f"/v1/devices/{n}").status == 204
