"""systemd integration: the units verify, the daemon serves an inherited socket (socket
activation), and it says READY=1 only once the API answers, STOPPING=1 on SIGTERM."""
import os
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import BIN
import net
import rawhttp
from mqtapd_client import ROOT, Client

UNITS = os.path.join(ROOT, "deploy", "systemd")


# Skipped only outside CI: in CI (CI=true) a missing tool is an install step missing, so the
# test runs and fails.
IN_CI = os.environ.get("CI") == "true"


@pytest.mark.skipif(not shutil.which("systemd-analyze") and not IN_CI, reason="systemd-analyze is not installed")
def test_units_verify(tmpdir_short):
    for unit in ("mqtapd.service", "mqtapd.socket"):
        text = open(os.path.join(UNITS, unit)).read()
        # verify checks that ExecStart exists: point it at the binary under test.
        with open(os.path.join(tmpdir_short, unit), "w") as f:
            f.write(text.replace("/usr/local/bin/mqtapd", BIN))
    r = subprocess.run(["systemd-analyze", "verify", os.path.join(tmpdir_short, "mqtapd.socket"),
                        os.path.join(tmpdir_short, "mqtapd.service")], capture_output=True, text=True)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "mqtapd" in line]
    assert r.returncode == 0 and not complaints, complaints
    service = open(os.path.join(UNITS, "mqtapd.service")).read()
    for line in ["Type=notify", "AmbientCapabilities=CAP_NET_ADMIN", "CapabilityBoundingSet=CAP_NET_ADMIN",
                 "DeviceAllow=/dev/net/tun rw", "StateDirectory=mqtapd", "RuntimeDirectory=mqtapd", "LimitNOFILE="]:
        assert line in service, line


@pytest.mark.skipif(not shutil.which("systemd-socket-activate") and not IN_CI,
                    reason="systemd-socket-activate is not installed")
def test_serves_an_inherited_socket(tmpdir_short):
    path = os.path.join(tmpdir_short, "activated.sock")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", path, BIN, "--state-dir", os.path.join(tmpdir_short, "state")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The first connection starts mqtapd with the listening socket as fd 3.
        r = Client(unix_path=path).get("/v1/health")
        assert r.status == 200
        assert Client(unix_path=path).get("/v1/limits").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    log = proc.stderr.read()
    assert rc == 0, log
    assert f"listening on unix:{path}" in log


def test_a_stop_leaves_the_inherited_socket_listening_for_the_next_start(tmpdir_short):
    """As systemd does with mqtapd.socket: the listening socket is kept by the manager and
    handed to every start. A stop closes the daemon's copy only: it never shuts the socket
    itself down (libmicrohttpd's thread pool did, with shutdown(2): the socket unit failed on
    its hang-up and a restarted daemon found it refusing connections)."""
    path = os.path.join(tmpdir_short, "held.sock")
    held = socket.socket(socket.AF_UNIX)
    try:
        held.bind(path)
        held.listen(16)
        for start in range(2):
            # fd 3 and LISTEN_PID of the process that execs mqtapd, as systemd passes them.
            proc = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', BIN,
                                     "--state-dir", os.path.join(tmpdir_short, "state")],
                                    env=dict(os.environ, LISTEN_FDS="1"), close_fds=False,
                                    preexec_fn=lambda: os.dup2(held.fileno(), 3),
                                    stderr=subprocess.PIPE, text=True)
            try:
                assert net.settle(lambda: _answers(path)), f"start {start} does not answer"
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(30)
                log = proc.stderr.read()
            assert rc == 0, log
            poller = select.poll()
            poller.register(held, select.POLLIN | select.POLLHUP | select.POLLERR)
            assert not [e for _, e in poller.poll(0) if e & (select.POLLHUP | select.POLLERR)], \
                "the stop hung up the listening socket"
            # Still listening: a connect is queued for the next start, not refused.
            rawhttp.connect(path, timeout=5).close()
    finally:
        held.close()


def _answers(path):
    try:
        return Client(unix_path=path, timeout=5).get("/v1/health").status == 200
    except OSError:
        return False


def test_ready_only_once_the_api_answers(tmpdir_short):
    notify = os.path.join(tmpdir_short, "notify.sock")
    api_path = os.path.join(tmpdir_short, "api.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(notify)
    s.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    proc = subprocess.Popen([BIN, "--listen", f"unix:{api_path}", "--state-dir", os.path.join(tmpdir_short, "state")],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        msg = s.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        # Ready means serving: the very next request is answered.
        assert Client(unix_path=api_path).get("/v1/health").status == 200
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in s.recv(4096).decode()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        s.close()
