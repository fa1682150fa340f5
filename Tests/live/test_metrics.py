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


def test_a_scraper_reads_the_token_through_the_files_group(tmpdir_short):
    """As Debian's Prometheus would: an unprivileged user that may read the token file only as
    a member of its group (mode 640) scrapes /metrics over TCP; promtool accepts the README's
    scrape configuration and the exposition. A file others may read is refused at start."""
    import grp
    from conftest import Daemon
    promtool = shutil.which("promtool") or shutil.which("promtool", path=os.path.join(ROOT, ".build-tools", "bin"))
    assert promtool, "no promtool on PATH or in .build-tools/bin: run scripts/install-deps.sh --test"
    nogroup = grp.getgrnam("nogroup").gr_gid
    os.chmod(tmpdir_short, 0o755)  # the scraper must reach the token file's directory
    d = Daemon(tmpdir_short, token_group=nogroup)
    try:
        assert oct(os.stat(d.token_file).st_mode & 0o777) == "0o640"
        config = os.path.join(tmpdir_short, "prometheus.yml")
        with open(config, "w") as f:
            f.write("scrape_configs:\n  - job_name: mqtapd\n"
                    f"    authorization: {{ credentials_file: {d.token_file} }}\n"
                    f"    static_configs: [{{ targets: [\"127.0.0.1:{d.port}\"] }}]\n")
        os.chmod(config, 0o644)
        as_scraper = ["setpriv", "--reuid=65534", f"--regid={nogroup}", "--clear-groups"]
        check = subprocess.run(as_scraper + [promtool, "check", "config", config], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # Without the group, the token cannot be read: the permission is the group's alone.
        denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65533", "--clear-groups", "cat", d.token_file],
                                capture_output=True, text=True)
        assert denied.returncode != 0
        scrape = subprocess.run(as_scraper + ["sh", "-c", f'curl -sf -H "Authorization: Bearer $(cat {d.token_file})" '
                                f"http://127.0.0.1:{d.port}/metrics | {promtool} check metrics"],
                                capture_output=True, text=True)
        assert scrape.returncode == 0, scrape.stdout + scrape.stderr
    finally:
        assert d.stop() == 0
    os.chmod(d.token_file, 0o644)
    bad = subprocess.run([d.proc.args[0], "--listen", f"unix:{tmpdir_short}/b.sock", "--state-dir", f"{tmpdir_short}/b",
                          "--listen", "tcp:127.0.0.1:0", "--token-file", d.token_file], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "chmod 600 or 640" in bad.stderr, bad.stderr
