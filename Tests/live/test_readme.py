"""The README's curl walk-through, run verbatim against a daemon (only the socket path and
the device name are this test's), checking every step's HTTP status."""
import os
import re
import subprocess

import net
from conftest import Daemon, unique_name
from mqtapd_client import ROOT


def walkthrough():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Walk-through with curl", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_readme_walkthrough_runs_verbatim(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    dev = unique_name("rm")
    script = walkthrough().replace("/run/mqtapd/api.sock", d.socket).replace("mq0", dev)
    try:
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        # Each curl prints its body (ending in a newline) and then its status on a line of its own.
        codes = [int(line) for line in r.stdout.splitlines() if re.fullmatch(r"\d{3}", line)]
        assert codes == [201, 200, 201, 200, 204, 200, 409, 200, 200, 204], r.stdout
        assert f'mqtapd_queue_rx_packets_total{{device="{dev}"' in r.stdout
        assert not net.exists(dev)
    finally:
        assert d.stop() == 0
        net.delete_link(dev)
