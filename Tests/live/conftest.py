"""Live tests: the real mqtapd binary on a temporary Unix socket and a free loopback TCP port."""
import os
import select
import signal
import subprocess
import tempfile
import time

import pytest

from mqtapd_client import ROOT, Client
import net

BIN = os.environ.get("MQTAPD_BIN", os.path.join(ROOT, ".build", "debug", "mqtapd"))
PREFIX = f"mql{os.getpid() % 100000}"
_counter = [0]


def privileged():
    return os.geteuid() == 0 and os.access("/dev/net/tun", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config, items):
    if privileged():
        return
    if os.environ.get("CI") == "true":
        # In CI a privileged test that cannot run is a failure, not a skip.
        raise pytest.UsageError("CI=true but no root or /dev/net/tun: the live tests cannot run")
    for item in items:
        item.add_marker(pytest.mark.skip(reason="needs root and /dev/net/tun (with CI=true this fails instead)"))


def unique_name(tag="d"):
    _counter[0] += 1
    return f"{PREFIX}{tag}{_counter[0]}"[:15]


class Daemon:
    """One mqtapd process; `stop()` sends SIGTERM and returns the exit status."""

    def __init__(self, tmp, *extra, tcp=True, workers=2):
        self.tmp = tmp
        self.socket = os.path.join(tmp, "run", "api.sock")
        args = [BIN, "--listen", f"unix:{self.socket}", "--state-dir", os.path.join(tmp, "state"),
                "--workers", str(workers)]
        if tcp:
            args += ["--listen", "tcp:127.0.0.1:0"]
        args += list(extra)
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.log = []
        self.port = None
        want = 2 if tcp else 1
        ready = 0
        deadline = time.monotonic() + 30
        while ready < want:
            line = self._line(deadline)
            if line is None:
                raise RuntimeError("mqtapd did not get ready:\n" + "\n".join(self.log))
            if line.startswith("mqtapd: listening on "):
                ready += 1
                addr = line.split("listening on ", 1)[1]
                if addr.startswith("tcp:"):
                    self.port = int(addr.rsplit(":", 1)[1])
        self.unix = Client(unix_path=self.socket)
        self.tcp = Client(tcp_port=self.port) if tcp else None

    def _line(self, deadline):
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                c = os.read(self.proc.stderr.fileno(), 1)
                if not c:
                    return None
                if c == b"\n":
                    line = buf.decode(errors="replace")
                    self.log.append(line)
                    return line
                buf += c
            elif self.proc.poll() is not None:
                return None
        return None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        rest = self.proc.stderr.read().decode(errors="replace")
        self.log.extend(rest.splitlines())
        return rc


@pytest.fixture(scope="session")
def daemon():
    with tempfile.TemporaryDirectory(prefix="mqtapd-live-") as tmp:
        d = Daemon(tmp)
        yield d
        rc = d.stop()
        assert rc == 0, "\n".join(d.log[-20:])
        for n in net.tap_names():
            if n.startswith(PREFIX):
                net.delete_link(n)


@pytest.fixture
def api(daemon):
    return daemon.unix


@pytest.fixture
def name():
    """A unique device name, deleted after the test whatever happened."""
    created = []

    def make(tag="d"):
        n = unique_name(tag)
        created.append(n)
        return n

    yield make
    for n in created:
        net.delete_link(n)


@pytest.fixture
def tmpdir_short():
    with tempfile.TemporaryDirectory(prefix="mq-") as tmp:
        yield tmp
