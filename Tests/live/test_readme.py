"""The README's shell blocks, run verbatim.

A fenced `sh`/`bash` block with the line `<!-- runnable -->` right before it is run as written;
one with `<!-- not runnable: WHY -->` is not (it builds, installs, or follows until Ctrl-C),
and a shell block with neither fails the first test here. Each README section's runnable
blocks run in order as one bash script (`set -eEo pipefail`, from the repository's top
directory, the binaries' directory first on PATH) in a private mount and network namespace
(sandbox.py): /run/mqtapd/api.sock, the default socket, is a daemon this test starts there
with `--listen tcp:127.0.0.1:8080 --token-file /etc/mqtapd/token` as well (the README's
`make run ARGS=…`), and the devices, /run/netns names and /etc files the blocks make are the
namespace's own, so fixed names (vm0, mq0, a, b, nca) meet nothing of the host's and the host
sees none of them. A failure names the block (its README line) and the command that failed.
After the script every device the daemon still has is deleted through the API, the daemon
stops, and whatever else is left in the namespace is killed and named."""
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BIN, Daemon, build_guest
from mqtapd_client import ROOT
from sandbox import Sandbox

README = os.path.join(ROOT, "README.md")
RUNNABLE = "<!-- runnable -->"
NOT_RUNNABLE = re.compile(r"<!-- not runnable: \S.* -->")
SHELLS = ("sh", "bash", "shell", "console")
# What the blocks expect of the daemon (the README's `make run ARGS=…`).
LISTEN = ["--listen", "unix:/run/mqtapd/api.sock", "--listen", "tcp:127.0.0.1:8080", "--token-file", "/etc/mqtapd/token"]


class Block:
    def __init__(self, section, lang, line, text, marker):
        self.section, self.lang, self.line, self.text, self.marker = section, lang, line, text, marker

    def __repr__(self):
        return f"README.md:{self.line} ({self.section})"


def blocks(path=README):
    """Every fenced block: its section (the `## ` heading above it), language, first line's
    number, text and the marker line right before its fence (or None)."""
    out, section, fence = [], "", None
    lines = open(path).read().split("\n")
    for i, line in enumerate(lines):
        if fence is None:
            m = re.match(r"^```(\S*)\s*$", line)
            if m:
                marker = lines[i - 1].strip() if i and lines[i - 1].strip().startswith("<!--") else None
                fence = (m.group(1), i + 2, marker, [])
            elif line.startswith("## "):
                section = line[3:].strip()
        elif line.strip() == "```":
            lang, first, marker, body = fence
            out.append(Block(section, lang, first, "\n".join(body) + "\n", marker))
            fence = None
        else:
            fence[3].append(line)
    assert fence is None, "README.md ends inside a fenced block"
    return out


def sections():
    """The runnable blocks, by section, in README order."""
    by = {}
    for b in blocks():
        if b.marker == RUNNABLE:
            by.setdefault(b.section, []).append(b)
    return by


def slug(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def test_every_shell_block_says_whether_it_runs():
    text = open(README).read()
    unmarked = [b for b in blocks() if b.lang in SHELLS and b.marker != RUNNABLE
                and not (b.marker and NOT_RUNNABLE.fullmatch(b.marker))]
    assert not unmarked, f"shell blocks marked neither {RUNNABLE} nor <!-- not runnable: WHY -->: {unmarked}"
    lines = text.split("\n")
    stray = [i + 1 for i, l in enumerate(lines) if (l.strip() == RUNNABLE or NOT_RUNNABLE.fullmatch(l.strip()))
             and not (i + 1 < len(lines) and lines[i + 1].startswith("```"))]
    assert not stray, f"markers not right before a fence, at README.md lines {stray}"
    runnable = [b for b in blocks() if b.marker == RUNNABLE]
    assert all(b.lang in SHELLS for b in runnable), [b for b in runnable if b.lang not in SHELLS]
    assert len(runnable) >= 6, runnable


def script(blocks_):
    """One bash script of the blocks, and for each of its lines the block it came from."""
    lines = ["set -eEo pipefail",
             "trap 'rc=$?; echo \"README-FAILED line=$LINENO status=$rc command: $BASH_COMMAND\" >&2' ERR"]
    origin = [None, None]
    for b in blocks_:
        lines.append(f"echo '=== {b!r}' >&2")
        origin.append(b)
        for n, l in enumerate(b.text.rstrip("\n").split("\n")):
            lines.append(l)
            origin.append((b, b.line + n))
    return "\n".join(lines) + "\n", origin


def failed_at(stderr, origin):
    """Where the script failed: the README line and its block, from the ERR trap's line."""
    m = re.findall(r"README-FAILED line=(\d+) status=(\d+) command: (.*)", stderr)
    if not m:
        started = re.findall(r"^=== (.*)$", stderr, re.M)
        return f"in block {started[-1] if started else '?'} (no command failed: killed, or a timeout)"
    line, status, command = m[0]
    o = origin[int(line) - 1] if 0 < int(line) <= len(origin) else None
    if isinstance(o, tuple):
        return f"in block {o[0]!r}: README.md:{o[1]} exited {status}: {command}"
    return f"at script line {line} exited {status}: {command}"


def prepare_leases(sb):
    """The guest is built outside the namespace first, where the network is: the recipe's
    own build-guest.sh then finds every package installed and the kernel package cached, and
    needs none."""
    build_guest(timeout=900)


def prepare_libvirt(sb):
    """libvirt's user, as libvirt-daemon-system makes it, if this host has no libvirt (in the
    namespace's /etc only)."""
    sb.add_user("libvirt-qemu")


PREPARE = {"Leases: handing queues to a VMM": prepare_leases,
           "VMs and libvirt: lease, or `external`": prepare_libvirt}


def check_walkthrough(out):
    # Each curl prints its body (ending in a newline) and then its status on a line of its own.
    codes = [int(line) for line in out.splitlines() if re.fullmatch(r"\d{3}", line)]
    assert codes == [201, 200, 201, 200, 204, 200, 409, 200, 200, 204], out
    assert 'mqtapd_queue_rx_packets_total{device="mq0"' in out


def check_qemu(out):
    lines = [l.strip() for l in out.replace("\r", "").split("\n")]
    ready = [l for l in lines if l.startswith("MQT-READY")]
    assert ready and "rxq=4 txq=4" in ready[0], lines[-40:]
    assert any(l.startswith("MQT-PING-OK") for l in lines), lines[-40:]


def check_events(out):
    assert "device.created" in out and '"type":"device.changed"' in out and '"mtu":1400' in out, out


CHECKS = {"Walk-through with curl": check_walkthrough,
          "Leases: handing queues to a VMM": check_qemu,
          "Events: watching instead of polling": check_events}


def run_section(title, blocks_, tmp, timeout=900):
    sb = Sandbox()
    d = proc = None
    cleanup, ok = [], False
    try:
        PREPARE.get(title, lambda sb: None)(sb)
        assert sb.taps() == set(), "a new namespace has no devices"
        # The token file the README names, in the namespace's /etc.
        os.makedirs(sb.path("/etc/mqtapd"), exist_ok=True)
        fd = os.open(sb.path("/etc/mqtapd/token"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, os.urandom(16).hex().encode() + b"\n")
        os.close(fd)
        d = Daemon(tmp, *LISTEN, tcp=False, prefix=sb.prefix())
        d.wait_line(lambda log: sum(l.startswith("mqtapd: listening on ") for l in log) >= 3)
        text, origin = script(blocks_)
        env = dict(os.environ, PATH=os.path.dirname(BIN) + ":" + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
        t0 = time.monotonic()
        proc = subprocess.Popen(sb.prefix(wd=ROOT) + ["bash", "-c", text], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        took = time.monotonic() - t0
        print(f"{title}: {len(blocks_)} block(s) in {took:.1f} s")
        assert proc.returncode == 0, f"{title}: failed {failed_at(err, origin)}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        ok = True
        return out, err
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the blocks left running
            except ProcessLookupError:
                pass
        if d is not None:
            if d.proc.poll() is None:
                # Everything the daemon still has is the blocks': delete it (persistent devices
                # and leases included) before it stops.
                for dev in d.unix.get("/v1/devices", check=False).json().get("devices", []):
                    d.unix.delete(f"/v1/devices/{dev['name']}?force=true", check=False)
                cleanup.append(("devices left", sorted(sb.taps())))
            rc = d.stop()
            cleanup.append(("daemon exit", rc))
        left = sb.close()
        cleanup.append(("processes left", left))
        print("cleanup:", cleanup)
        if ok:
            assert cleanup == [("devices left", []), ("daemon exit", 0), ("processes left", [])], \
                (cleanup, "\n".join(d.log[-20:]))


@pytest.mark.parametrize("title", list(sections()), ids=slug)
def test_readme_section_runs_verbatim(title):
    with tempfile.TemporaryDirectory(prefix="mq-") as tmp:
        out, _ = run_section(title, sections()[title], tmp)
    CHECKS.get(title, lambda out: None)(out)
