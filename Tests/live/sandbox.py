"""A private mount and network namespace for a test: whatever it makes there (devices, named
namespaces under /run/netns, sockets under /run, files under /etc) is its own, seen by no
other process, and goes when the namespace does.

Inside, /run is an empty tmpfs (so /run/mqtapd/api.sock, the README's default socket, is the
test's own), /etc is an overlay whose writes go to that tmpfs (the host's /etc is never
written), /sys is a sysfs of the new network namespace (so /sys/class/net shows its
devices, as `ip netns exec` arranges), and lo is up. A holder process (`sleep`) keeps both
namespaces; `prefix()` runs a command in them with nsenter, `path()` reaches a file in them
from outside (through /proc/PID/root), `close()` ends every process left inside and the
holder, and with them the namespaces and everything in them."""
import os
import signal
import subprocess
import time

import net

SETUP = r"""
set -e
mount -t tmpfs -o mode=0755 mqt-sandbox-run /run
mkdir -p /run/mqtapd /run/netns /run/.sandbox/etc-upper /run/.sandbox/etc-work
mount -t overlay mqt-sandbox-etc -o lowerdir=/etc,upperdir=/run/.sandbox/etc-upper,workdir=/run/.sandbox/etc-work /etc
mount -t sysfs mqt-sandbox-sys /sys
ip link set dev lo up
echo ready
exec sleep infinity
"""


class Sandbox:
    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private", "bash", "-c", SETUP],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            err = self.proc.communicate()[1]
            raise RuntimeError(f"the sandbox namespace could not be set up: {err.strip()}")
        self.proc.stdout.close()
        self.pid = self.proc.pid
        self.netns = os.readlink(f"/proc/{self.pid}/ns/net")
        self.mntns = os.readlink(f"/proc/{self.pid}/ns/mnt")

    def prefix(self, wd=None):
        """A command line prefix that runs what follows in the sandbox (nsenter execs it, so the
        process started is the command itself)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net"] + ([f"--wd={wd}"] if wd else []) + ["--"]

    def path(self, p):
        """`p` as the sandbox sees it, for reading and writing from outside."""
        return f"/proc/{self.pid}/root{p}"

    def taps(self):
        """The TUN/TAP devices in the sandbox's network namespace."""
        d = self.path("/sys/class/net")
        return {n for n in os.listdir(d) if os.path.exists(os.path.join(d, n, "tun_flags"))}

    def add_user(self, name):
        """A system user and group `name` in the sandbox's /etc (the host's is untouched), if it
        has none."""
        passwd, group = self.path("/etc/passwd"), self.path("/etc/group")
        with open(passwd) as f:
            users = [l.split(":") for l in f if l.strip()]
        if any(u[0] == name for u in users):
            return
        with open(group) as f:
            groups = [l.split(":") for l in f if l.strip()]
        taken = {int(u[2]) for u in users} | {int(g[2]) for g in groups}
        uid = next(i for i in range(999, 99, -1) if i not in taken)
        with open(group, "a") as f:
            f.write(f"{name}:x:{uid}:\n")
        with open(passwd, "a") as f:
            f.write(f"{name}:x:{uid}:{uid}:{name} (sandbox):/nonexistent:/usr/sbin/nologin\n")

    def processes(self):
        """Processes in the sandbox's network or mount namespace, the holder aside."""
        return [p for p in net.pids_in(net=self.netns, mnt=self.mntns) if p != self.pid]

    def close(self):
        """Kills whatever still runs inside (returned: their command lines), then the holder;
        the namespaces go with the last of them."""
        left = []
        for pid in self.processes():
            cmd = net.cmdline(pid).strip()
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue  # gone meanwhile
            left.append(cmd)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        return left
