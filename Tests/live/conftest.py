"""Live tests: the real mqtapd binary on a temporary Unix socket and a free loopback TCP port."""
import os
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from mqtapd_client import ROOT, Client
import net

# The binaries under test: the environment's, else the debug build's. mqtap is looked for
# beside mqtapd (a build puts them in one folder).
BIN = os.environ.get("MQTAPD_BIN", os.path.join(ROOT, ".build", "debug", "mqtapd"))
MQTAP_BIN = os.environ.get("MQTAP_BIN", os.path.join(os.path.dirname(BIN), "mqtap"))
CNI_BIN = os.environ.get("MQTAP_CNI_BIN", os.path.join(ROOT, ".build", "debug", "mqtap-cni"))
# The test guest's kernel and initramfs (scripts/build-guest.sh).
GUEST = os.path.join(ROOT, ".build-guest")
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


def need(ok, why):
    """A missing prerequisite: a skip, or with CI=true a failure."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and a prerequisite is missing: {why}")
    pytest.skip(f"{why} (with CI=true this fails instead)")


def build_guest(timeout=None):
    """Builds the test guest from Debian packages (scripts/build-guest.sh: installed packages
    and the cached kernel package are used again); returns (kernel, initramfs)."""
    r = subprocess.run([os.path.join(ROOT, "scripts", "build-guest.sh"), GUEST], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(GUEST, "vmlinuz"), os.path.join(GUEST, "initrd.cpio.gz")


def unique_name(tag="d"):
    _counter[0] += 1
    return f"{PREFIX}{tag}{_counter[0]}"[:15]


class Daemon:
    """One mqtapd process; `stop()` sends SIGTERM and returns the exit status."""

    def __init__(self, tmp, *extra, tcp=True, workers=2, prefix=(), ready=True, token_group=None):
        self.tmp = tmp
        self.socket = os.path.join(tmp, "run", "api.sock")
        args = list(prefix) + [BIN, "--listen", f"unix:{self.socket}", "--state-dir", os.path.join(tmp, "state"),
                "--workers", str(workers)]
        self.token = None
        if tcp:
            # TCP needs a token: a file only its owner may read.
            self.token_file = os.path.join(tmp, "token")
            self.token = "t-" + os.urandom(16).hex()
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, (self.token + "\n").encode())
            os.close(fd)
            if token_group is not None:
                # Readable by a scraper's group too (mode 640), as the README says.
                os.chown(self.token_file, -1, token_group)
                os.chmod(self.token_file, 0o640)
            args += ["--listen", "tcp:127.0.0.1:0", "--token-file", self.token_file]
        args += list(extra)
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.log = []
        self.port = None
        # stderr is drained for the daemon's whole life: a full pipe would block its logging.
        self._lines = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self._want = 2 if tcp else 1
        self.unix = self.tcp = None
        if ready:
            try:
                self.wait_ready()
            except BaseException:
                self.proc.kill()
                self.proc.wait()
                raise

    def wait_line(self, pred, timeout=30):
        """The daemon's log lines once `pred` holds for them; raises if the daemon ends or
        `timeout` passes first."""
        deadline = time.monotonic() + timeout
        with self._lines:
            while not pred(self.log):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mqtapd did not log what was awaited:\n" + "\n".join(self.log))
                self._lines.wait(0.2)
            return list(self.log)

    def wait_ready(self, timeout=30):
        """Waits for a `listening on` line per listener; then the clients are ready."""
        listening = lambda log: [l for l in log if l.startswith("mqtapd: listening on ")]
        ready = listening(self.wait_line(lambda log: len(listening(log)) >= self._want, timeout))
        for line in ready:
            addr = line.split("listening on ", 1)[1]
            if addr.startswith("tcp:"):
                self.port = int(addr.rsplit(":", 1)[1])
        self.unix = Client(unix_path=self.socket)
        self.tcp = Client(tcp_port=self.port, token=self.token) if self._want == 2 else None

    def _drain(self):
        for raw in self.proc.stderr:
            with self._lines:
                self.log.append(raw.decode(errors="replace").rstrip("\n"))
                self._lines.notify_all()

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        if rc not in (0, -signal.SIGKILL):
            # A crash's cause is at the top of its report, which the last lines an assertion
            # shows do not reach: the whole log is kept, and said where.
            path = os.path.join(tempfile.gettempdir(), f"mqtapd-exit{rc}-{self.proc.pid}.log")
            with open(path, "w") as f:
                f.write("\n".join(self.log) + "\n")
            print(f"mqtapd {self.proc.pid} exited with {rc}; its whole log: {path}")
        return rc


@pytest.fixture(scope="session")
def daemon():
    with tempfile.TemporaryDirectory(prefix="mqtapd-live-") as tmp:
        d = Daemon(tmp)
        yield d
        rc = d.stop()
        assert rc == 0, "\n".join(d.log[-20:])
        for n in net.tap_names(PREFIX):
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
