"""A private libvirtd for the live tests, started by hand (no systemd), that leaves the host as
it found it.

How it keeps off the host:

- libvirtd runs inside its own mount namespace (`unshare --mount --propagation private`). In
  there, temporary directories are bind-mounted over `/etc/libvirt`, `/var/lib/libvirt`,
  `/var/cache/libvirt`, `/var/log/libvirt` and `/run/libvirt`: its `libvirtd.conf` and
  `qemu.conf` are ours, and everything it writes (domain XML, state, pid files, capability
  cache, QEMU's log) lands in the temporary directory. The real `/etc/libvirt` is never
  written: the mounts exist only in that namespace and go with it.
- Debian's libvirt looks up its compiled-in QEMU user and group, `libvirt-qemu`, before it
  reads qemu.conf (which says root), and without `libvirt-daemon-system` they do not exist.
  Rather than add them to the host, copies of `/etc/passwd` and `/etc/group` that have them
  are bind-mounted over the real ones, again only in libvirtd's namespace.
- A mount point that did not exist is created empty for the mount and removed afterwards
  (Debian's `libvirt-daemon` creates none of the `/var` or `/run` ones; `libvirt-clients`
  ships `/etc/libvirt`).
- Its sockets are in the temporary directory (`unix_sock_dir`); clients connect with
  `qemu:///system?socket=…`, so it never meets a libvirtd of the host's.
- No network, nwfilter or storage pool is defined (its `/etc/libvirt` starts empty): nothing
  creates `virbr0` or touches the firewall. No cgroups (`cgroup_controllers = []`), no
  per-domain /dev namespace, no security driver, no virtlogd (`stdio_handler = "file"`), QEMU
  runs as root: interfaces of `type='ethernet'` with `managed='no'` are opened by name and
  left alone.
- `stop()` destroys every domain, ends libvirtd by pid (SIGTERM, then SIGKILL), kills every
  process still in its mount namespace (the QEMUs it started: nothing else can be in there),
  and removes what it created.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import net
from net import Unavailable, installed

PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients")
LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "/usr/bin/virsh"
# Debian's compiled-in qemu user and group (qemu_user/qemu_group), looked up at start.
QEMU_USER = QEMU_GROUP = "libvirt-qemu"
# Where a privileged libvirtd reads and writes (compiled in; only libvirtd.conf has a flag).
MOUNTS = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/run/libvirt")

LIBVIRTD_CONF = """\
# A private libvirtd for mqtapd's live tests (libvirt_host.py).
unix_sock_dir = "{sock}"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
listen_tls = 0
listen_tcp = 0
log_outputs = "3:file:{log}"
"""

QEMU_CONF = """\
# A private libvirtd for mqtapd's live tests (libvirt_host.py).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""


def _pids_of(exe):
    """Processes whose executable is `exe` (by /proc/PID/exe, not by a name pattern), in this
    process's mount namespace, where a package's service starts: never a private libvirtd that
    another test runs in a namespace of its own."""
    pids = set()
    here = os.readlink("/proc/self/ns/mnt")
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/exe") == exe and os.readlink(f"/proc/{p}/ns/mnt") == here:
                    pids.add(int(p))
            except OSError:
                pass
    return pids


def ensure_packages():
    """Installs the Debian packages if any is missing, as the project's test scripts install
    their own tools. Installing must not leave a service running: any libvirtd or virtlogd
    that appeared during the install is stopped again (Debian's libvirt-daemon ships no
    init script, so normally there is none)."""
    missing = [p for p in PACKAGES if not installed(p)]
    if missing:
        if not shutil.which("apt-get"):
            raise Unavailable(f"libvirt packages missing ({' '.join(missing)}) and no apt-get")
        daemons = ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/sbin/virtlockd")
        before = {d: _pids_of(d) for d in daemons}
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            # A missing or stale package list: update once and retry.
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        for d in daemons:
            for pid in _pids_of(d) - before[d]:
                net.terminate(pid)
        if r.returncode != 0:
            raise Unavailable(f"apt-get install {' '.join(missing)} failed: {r.stderr[-1500:]}")
    for path in (LIBVIRTD, VIRSH, shutil.which("unshare") or "/usr/bin/unshare", shutil.which("mount") or "/bin/mount"):
        if not os.access(path, os.X_OK):
            raise Unavailable(f"{path} is missing")


class Libvirtd:
    """One private libvirtd. `start()` returns once it answers; `virsh(...)` runs virsh
    against it; `stop()` leaves nothing behind. Also a context manager."""

    def __init__(self, tmp=None):
        # Short: the sockets live under it (108-byte sun_path).
        self._own_tmp = tmp is None
        self.tmp = tmp or tempfile.mkdtemp(prefix="mqlv-")
        self.sock_dir = os.path.join(self.tmp, "sock")
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.dirs = {m: os.path.join(self.tmp, "root", m.strip("/").replace("/", "-")) for m in MOUNTS}
        self.etc = self.dirs["/etc/libvirt"]
        self.log_file = os.path.join(self.tmp, "libvirtd.log")
        self.stderr_file = os.path.join(self.tmp, "libvirtd.stderr")
        self.proc = None
        self._warming = None
        self.mnt_ns = None
        self._created = []  # (mount point, topmost directory made for it) on the host, to remove
        self._etc_before = None

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout=60.0):
        os.makedirs(self.sock_dir, mode=0o700)
        for d in self.dirs.values():
            os.makedirs(d, mode=0o755)
        for sub in ("qemu", "qemu/networks", "qemu/autostart"):
            os.makedirs(os.path.join(self.etc, sub))
        for sub in ("var-lib-libvirt/qemu", "var-cache-libvirt/qemu", "var-log-libvirt/qemu", "run-libvirt/qemu"):
            os.makedirs(os.path.join(self.tmp, "root", sub), exist_ok=True)
        with open(os.path.join(self.etc, "libvirtd.conf"), "w") as f:
            f.write(LIBVIRTD_CONF.format(sock=self.sock_dir, log=self.log_file))
        with open(os.path.join(self.etc, "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        # The mount points: made empty where missing, removed again in stop().
        for m in MOUNTS:
            if not os.path.exists(m):
                top = m
                while not os.path.exists(os.path.dirname(top)):
                    top = os.path.dirname(top)
                os.makedirs(m, mode=0o755)
                self._created.append((m, top))
        binds = list(self.dirs.items()) + self._identity_files()
        script = "set -e\n" + "".join(f"mount --bind '{src}' '{dst}'\n" for dst, src in binds) + \
            f"exec {LIBVIRTD} --config '{self.etc}/libvirtd.conf' --pid-file '{self.tmp}/libvirtd.pid'\n"
        self._etc_before = _tree("/etc/libvirt")
        # unshare execs (no --fork): the pid is the shell's, then libvirtd's.
        with open(self.stderr_file, "w") as stderr:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _identity_files(self):
        """(copy, real) pairs for /etc/passwd and /etc/group where the copy adds the
        libvirt-qemu user or group the real one lacks."""
        out = []
        for real, name, fmt in (("/etc/passwd", QEMU_USER, "{n}:x:{i}:{i}:mqtapd live tests:/nonexistent:/usr/sbin/nologin\n"),
                                ("/etc/group", QEMU_GROUP, "{n}:x:{i}:\n")):
            with open(real) as f:
                text = f.read()
            rows = [l.split(":") for l in text.splitlines() if l and not l.startswith("#")]
            if any(r[0] == name for r in rows):
                continue
            used = {int(r[2]) for r in rows if len(r) > 2 and r[2].isdigit()}
            ident = next(i for i in range(64055, 65534) if i not in used)
            copy = os.path.join(self.tmp, os.path.basename(real))
            with open(copy, "w") as f:
                f.write(text + ("" if text.endswith("\n") or not text else "\n") + fmt.format(n=name, i=ident))
            os.chmod(copy, 0o644)
            out.append((real, copy))
        return out

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        sock = os.path.join(self.sock_dir, "libvirt-sock")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}:\n{self.logs()}")
            if self.mnt_ns is None:
                try:
                    ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
                    if ns != os.readlink("/proc/self/ns/mnt"):
                        self.mnt_ns = ns
                except OSError:
                    pass
            if self.mnt_ns and os.path.exists(sock) and \
                    self.virsh("uri", check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer within {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def warm(self):
        """Has libvirtd probe QEMU's capabilities now, in the background (several seconds
        under TCG, otherwise spent by the first `define`), while the caller does other work."""
        if self._warming is None:
            self._warming = subprocess.Popen(
                [VIRSH, "-q", "-c", self.uri, "domcapabilities", "--virttype", "qemu"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=self._env())

    def stop(self):
        """Destroys every domain, ends libvirtd and everything it started, removes what was
        created. Safe to call twice. Returns a list of problems (empty when clean)."""
        problems = []
        if self._warming is not None:
            try:
                self._warming.wait(60)
            except subprocess.TimeoutExpired:
                self._warming.kill()
                self._warming.wait()
        if self.proc is not None and self.proc.poll() is None:
            try:
                for name in self.domains():
                    self.virsh("destroy", name, check=False)
                    self.virsh("undefine", name, "--nvram", check=False)
            except Exception as e:  # libvirtd hung: the kills below still run
                problems.append(f"listing domains: {e}")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                problems.append("libvirtd ignored SIGTERM for 15 s")
                self.proc.kill()
                self.proc.wait(15)
        if self.mnt_ns:
            # Only what libvirtd started can be in its mount namespace: the QEMUs.
            for pid in net.pids_in(mnt=self.mnt_ns):
                problems.append(f"left in libvirtd's namespace: {pid} {net.cmdline(pid)[:120]}")
                net.terminate(pid)
        for mount_point, top in reversed(self._created):
            net.rmdirs_up(mount_point, top)
            if os.path.exists(top):
                problems.append(f"could not remove {top}, which this harness created")
        self._created = []
        if self._etc_before is not None and _tree("/etc/libvirt") != self._etc_before:
            problems.append("/etc/libvirt changed while the private libvirtd ran")
        self._etc_before = None
        if self._own_tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ use
    def virsh(self, *args, check=True, timeout=60):
        r = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=self._env())
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.returncode}\n{r.stderr}\n{self.logs()}")
        return r

    def _env(self):
        # virsh keeps nothing in $HOME for one-shot commands; the XDG dirs point into the
        # temporary directory anyway.
        return dict(os.environ, XDG_CONFIG_HOME=os.path.join(self.tmp, "xdg-config"),
                    XDG_CACHE_HOME=os.path.join(self.tmp, "xdg-cache"), LIBVIRT_DEFAULT_URI=self.uri)

    def domains(self):
        r = self.virsh("list", "--all", "--name", check=False, timeout=20)
        return [l.strip() for l in r.stdout.splitlines() if l.strip()]

    def domain_state(self, name):
        r = self.virsh("domstate", name, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    def qemu_log(self, name):
        """QEMU's stdout/stderr and libvirt's command line for it."""
        return _read(os.path.join(self.dirs["/var/log/libvirt"], "qemu", f"{name}.log"))

    def qemu_pid(self, name):
        try:
            return int(_read(os.path.join(self.dirs["/run/libvirt"], "qemu", f"{name}.pid")).strip())
        except ValueError:
            return None

    def logs(self, tail=3000):
        return ("libvirtd stderr:\n" + _read(self.stderr_file)[-tail:] +
                "\nlibvirtd log:\n" + _read(self.log_file)[-tail:])



def _tree(top):
    """What is under `top` (paths, kinds, sizes, mtimes, modes), to tell whether it changed."""
    out = []
    for d, dirs, files in os.walk(top):
        for n in sorted(dirs + files):
            st = os.lstat(os.path.join(d, n))
            out.append((os.path.join(d, n), st.st_mode, st.st_size, st.st_mtime_ns))
    return sorted(out)


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
