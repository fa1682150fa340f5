"""A private podman for the live tests: Debian's podman 4.3 with its CNI backend, calling the CNI
plugins a test puts in a directory of its own, on an image built locally, leaving the host as
it found it.

How it keeps off the host:

- Everything podman and buildah keep lives in one temporary directory: image and container
  storage (`--root`, `--runroot`, driver `vfs`: a layer is a plain directory, so no overlay
  mount is ever left behind), libpod's tmpdir (`--tmpdir`: exit files, file locks, the events
  log), volumes, hooks, and the configuration: `CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`
  and `CONTAINERS_REGISTRIES_CONF` name files in there (/etc/containers and
  /usr/share/containers are only read: policy.json, seccomp.json).
- `buildah commit` writes the host's blob info cache (/var/lib/containers/cache) whatever
  `--root` says: `build_image` runs buildah in a mount namespace of its own with a temporary
  directory bind-mounted over that one.
- The network backend is `cni`, its config directory (`network_config_dir`, where the test's
  conflists go) and its only plugin directory (`cni_plugin_dirs`) are in the temporary
  directory; `default_network` names no network, so a `run` without `--network` fails
  instead of making podman's default bridge (cni-podman0, firewall rules) on the host. The
  plugin directory holds symlinks: the test's plugins (`mqtap-cni`) and the
  reference plugins of Debian's containernetworking-plugins (`/usr/lib/cni`: host-local,
  loopback, ...). host-local's `dataDir` is the test's to put in the temporary directory too.
- `lock_type = "file"`: the locks are files in the tmpdir, not the shared memory segment
  `/dev/shm/libpod_lock` the host's podman would use.
- runc: podman and conmon run a wrapper, `runc` in the temporary directory, that execs
  /usr/sbin/runc with `--root` there (as root podman passes none: the state would go to
  /run/runc).
- This host: `runtime = "runc"` (crun refuses its hybrid cgroup layout), `cgroup_manager =
  "cgroupfs"` (no systemd), `default_ulimits = []` (raising an rlimit is not permitted here),
  `log_driver = "k8s-file"` (no journald), `events_logger = "file"`. No registry is reachable:
  the image is built from scratch (`build_image`: a static busybox from Debian's
  busybox-static), and every `run` says `--pull never`.
- What cannot be private: podman (rootful) names each container's network namespace under
  `/run/netns` (`netns-…`), and libcni caches each ADD's result under `/var/lib/cni` (removed by
  DEL). Both must stay visible to the daemon the plugin talks to (it opens CNI_NETNS by path),
  so podman runs in the host's mount namespace; `stop()` removes the namespaces and the cache
  directories that appeared while it ran, and reports them.
- `stop()` removes every container (`rm -af`), waits for conmon to finish the container's
  cleanup, kills any process still naming the temporary directory (reported as a problem), unmounts whatever is still mounted under it, removes
  it, and compares the host paths podman could touch (/etc/containers, /etc/cni,
  /var/lib/containers, /run/containers, /run/netns, /var/lib/cni, /run/runc, /run/libpod,
  /dev/shm) with what they were at `start()`.

The harness installs nothing: `check_prerequisites()` raises Unavailable (the test skips, or
fails under CI=true) naming the Debian packages to install.
"""
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time

import net
from net import Unavailable, installed

PACKAGES = ("podman", "containernetworking-plugins", "runc", "buildah", "busybox-static")
PODMAN = "/usr/bin/podman"
BUILDAH = "/usr/bin/buildah"
RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
REFERENCE_PLUGINS = "/usr/lib/cni"
IMAGE = "localhost/mqtap-cni-test:latest"
HOST_BLOB_CACHE = "/var/lib/containers/cache"
# Where podman, buildah, runc and libcni could write on the host, compared before and after:
# all of it, or (shared places other tests use too) only entries of podman's naming.
HOST_PATHS = {"/etc/containers": None, "/etc/cni": None, "/var/lib/containers": None, "/run/containers": None,
              "/var/lib/cni": None, "/run/cni": None, "/run/runc": None, "/run/libpod": None,
              "/run/netns": ("netns-", "cni-"), "/dev/shm": ("libpod",)}
# libcni's result cache (one file per ADD, removed by its DEL), which podman's CNI backend does
# not let us move: made on demand; stop() removes the empty directories of it that it made.
EPHEMERAL = ("/var/lib/cni",)

CONTAINERS_CONF = """\
# A private podman for mqtapd's live tests (podman_host.py).
[containers]
default_ulimits = []
log_driver = "k8s-file"
netns = "bridge"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}"]
network_config_dir = "{netconf}"
default_network = "mqtnet-unused"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{tmpdir}/events.log"
lock_type = "file"
tmp_dir = "{tmpdir}"
volume_path = "{root}/volumes"
static_dir = "{root}/libpod"
hooks_dir = ["{hooks}"]
image_copy_tmp_dir = "{tmp}"
num_locks = 128

[engine.runtimes]
runc = ["{runc}"]
"""

STORAGE_CONF = """\
# A private podman for mqtapd's live tests (podman_host.py).
[storage]
driver = "vfs"
graphroot = "{root}"
runroot = "{runroot}"
"""

REGISTRIES_CONF = """\
# A private podman for mqtapd's live tests (podman_host.py): no registry is searched.
unqualified-search-registries = []
"""


def check_prerequisites():
    """Raises Unavailable unless Debian's podman, buildah, runc, CNI plugins and static busybox
    are installed (the harness does not install them)."""
    missing = [p for p in PACKAGES if not installed(p)]
    if missing:
        raise Unavailable(f"Debian packages missing: {' '.join(missing)} "
                          f"(apt-get install --no-install-recommends {' '.join(missing)})")
    for path in (PODMAN, BUILDAH, RUNC, BUSYBOX, os.path.join(REFERENCE_PLUGINS, "host-local"),
                 shutil.which("nsenter") or "/usr/bin/nsenter"):
        if not os.access(path, os.X_OK):
            raise Unavailable(f"{path} is missing")


class Podman:
    """One private podman. `plugins` maps a CNI plugin type to its executable (symlinked into the
    private plugin directory next to the reference plugins). `start()` prepares everything;
    `network(conflist)` adds a network; `build_image()` makes IMAGE; `podman(...)` runs podman;
    `stop()` leaves nothing behind and returns the problems it found. Also a context manager."""

    def __init__(self, plugins=None, tmp=None):
        self._own_tmp = tmp is None
        self.tmp = tmp or tempfile.mkdtemp(prefix="mqpod-")
        self.root = os.path.join(self.tmp, "storage")
        self.runroot = os.path.join(self.tmp, "run")
        self.tmpdir = os.path.join(self.tmp, "libpod")
        self.netconf = os.path.join(self.tmp, "net.d")
        self.plugin_dir = os.path.join(self.tmp, "cni-bin")
        self.cni_data = os.path.join(self.tmp, "cni-data")  # for host-local's dataDir
        self.conf_dir = os.path.join(self.tmp, "conf")
        self.plugins = dict(plugins or {})
        # runc keeps its state in /run/runc unless told otherwise, and podman does not tell it
        # (as root): a wrapper named runc, the one podman and conmon run, gives it --root.
        self.runc = os.path.join(self.tmp, "bin", "runc")
        self._before = None
        self._ephemeral = []
        self._started = False

    # ------------------------------------------------------------------ life cycle
    def start(self):
        self._before = {p: _tree(p, only) for p, only in HOST_PATHS.items()}
        self._ephemeral = [p for p in EPHEMERAL if not os.path.lexists(p)]
        self._started = True  # from here on, stop() has something to undo
        for d in (self.root, self.runroot, self.tmpdir, self.netconf, self.plugin_dir, self.cni_data,
                  self.conf_dir, os.path.join(self.tmp, "hooks"), os.path.join(self.tmp, "tmp"),
                  os.path.join(self.tmp, "bin"), os.path.join(self.tmp, "runc-state")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        with open(self.runc, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(RUNC)} --root {shlex.quote(os.path.join(self.tmp, 'runc-state'))} \"$@\"\n")
        os.chmod(self.runc, 0o755)
        values = dict(plugins=self.plugin_dir, netconf=self.netconf, tmpdir=self.tmpdir, root=self.root,
                      runroot=self.runroot, hooks=os.path.join(self.tmp, "hooks"), tmp=os.path.join(self.tmp, "tmp"),
                      runc=self.runc)
        for name, text in (("containers.conf", CONTAINERS_CONF), ("storage.conf", STORAGE_CONF),
                           ("registries.conf", REGISTRIES_CONF)):
            with open(os.path.join(self.conf_dir, name), "w") as f:
                f.write(text.format(**values))
        for n in sorted(os.listdir(REFERENCE_PLUGINS)):
            os.symlink(os.path.join(REFERENCE_PLUGINS, n), os.path.join(self.plugin_dir, n))
        for n, path in self.plugins.items():
            link = os.path.join(self.plugin_dir, n)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.abspath(path), link)
        return self

    def stop(self):
        """Removes every container and the temporary directory; safe to call twice. Returns a
        list of problems (empty when the host is as it was)."""
        problems = []
        if not self._started:
            return problems
        self._started = False
        if os.path.exists(os.path.join(self.conf_dir, "registries.conf")):
            r = self.podman("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
            if r.returncode != 0:
                problems.append(f"podman rm --all: {r.returncode} {r.stderr[-500:]}")
        # Nothing may still run from the private storage: conmon and a container's processes
        # name it (conmon by its arguments; a container's init by its root directory). conmon
        # may still be running the exit command for a moment after rm.
        deadline = time.monotonic() + 15
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.processes():
            problems.append(f"still running after rm: {pid} {net.cmdline(pid)[:160]}")
            net.terminate(pid)
        for m in self.mounts():
            problems.append(f"still mounted: {m}")
            subprocess.run(["umount", "--lazy", m], capture_output=True)
        # Network namespaces podman made and did not remove (a failed teardown).
        before_ns = set(n for n, *_ in self._before["/run/netns"])
        for path, *_ in _tree("/run/netns", HOST_PATHS["/run/netns"]):
            if path not in before_ns and path != "/run/netns":
                problems.append(f"network namespace left behind: {path}")
                subprocess.run(["umount", "--lazy", path], capture_output=True)
                try:
                    os.unlink(path)
                except OSError:
                    pass
        # Directories made on demand outside the temporary directory: the empty ones go; a
        # file left in them (a result DEL did not remove, or someone else's) stays, reported.
        for p in self._ephemeral:
            left = [x for x, mode, *_ in _tree(p) if not _isdir(mode)]
            if left:
                problems.append(f"left under {p}: {left[:5]}")
            for d, _, _ in sorted(os.walk(p), key=lambda w: len(w[0]), reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if os.path.exists(self.tmp):
                problems.append(f"could not remove {self.tmp}")
        for p, before in self._before.items():
            after = _tree(p, HOST_PATHS[p])
            if after != before:
                gone = sorted(set(before) - set(after))
                new = sorted(set(after) - set(before))
                problems.append(f"{p} changed while the private podman ran: new {new[:5]}, gone or changed {gone[:5]}")
        return problems

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ configuration
    def network(self, conflist):
        """Writes a conflist (a dict with `name`) where podman's CNI backend finds it."""
        path = os.path.join(self.netconf, f"{conflist['name']}.conflist")
        with open(path, "w") as f:
            json.dump(conflist, f, indent=2)
        return path

    def env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONTAINER", "BUILDAH", "PODMAN", "REGISTRY_AUTH", "CNI_"))}
        env.update(CONTAINERS_CONF=os.path.join(self.conf_dir, "containers.conf"),
                   CONTAINERS_STORAGE_CONF=os.path.join(self.conf_dir, "storage.conf"),
                   CONTAINERS_REGISTRIES_CONF=os.path.join(self.conf_dir, "registries.conf"),
                   TMPDIR=os.path.join(self.tmp, "tmp"),
                   PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return env

    def global_flags(self):
        return ["--root", self.root, "--runroot", self.runroot, "--storage-driver", "vfs",
                "--tmpdir", self.tmpdir, "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--network-config-dir", self.netconf, "--events-backend", "file",
                "--hooks-dir", os.path.join(self.tmp, "hooks")]

    # ------------------------------------------------------------------ use
    def podman(self, *args, check=True, timeout=120):
        r = subprocess.run([PODMAN, *self.global_flags(), *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, env=self.env())
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {r.returncode}\nstdout: {r.stdout[-2000:]}\n"
                               f"stderr: {r.stderr[-3000:]}")
        return r

    def buildah(self, *args, check=True, timeout=120):
        r = subprocess.run([BUILDAH, "--root", self.root, "--runroot", self.runroot, "--storage-driver", "vfs", *args],
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=self.env())
        if check and r.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)}: {r.returncode}\n{r.stderr[-3000:]}")
        return r

    def build_image(self, tag=IMAGE):
        """A one-layer image from scratch: Debian's static busybox with a link per applet in /bin
        (sh, ip, cat, ...), built with buildah into the private storage.

        `buildah commit` (like `podman import`) records the layer's digest in the host's blob
        info cache, /var/lib/containers/cache, whatever `--root` says. So the build runs in a
        mount namespace of its own where a directory of ours is bind-mounted over that one
        (made empty for the mount if the host has none, and removed again)."""
        rootfs = os.path.join(self.tmp, "rootfs")
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin", "busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            link = os.path.join(rootfs, "bin", a)
            if not os.path.lexists(link):
                os.symlink("busybox", link)
        with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        with open(os.path.join(rootfs, "etc", "group"), "w") as f:
            f.write("root:x:0:\nnogroup:x:65534:\n")
        cache = os.path.join(self.tmp, "blob-info-cache")
        os.makedirs(cache, exist_ok=True)
        made = None
        if not os.path.exists(HOST_BLOB_CACHE):
            made = HOST_BLOB_CACHE
            while not os.path.exists(os.path.dirname(made)):
                made = os.path.dirname(made)
            os.makedirs(HOST_BLOB_CACHE, mode=0o700)
        q = shlex.quote
        b = " ".join(q(x) for x in (BUILDAH, "--root", self.root, "--runroot", self.runroot, "--storage-driver", "vfs"))
        script = (f"set -e\nmount --bind {q(cache)} {q(HOST_BLOB_CACHE)}\n"
                  f"ctr=$({b} from --pull-never scratch)\n"
                  f"trap '{b} rm \"$ctr\" >/dev/null 2>&1 || true' EXIT\n"
                  f"{b} add --quiet \"$ctr\" {q(rootfs + '/')} /\n"
                  f"{b} config --cmd /bin/sh --env PATH=/bin \"$ctr\"\n"
                  f"{b} commit --quiet --rm \"$ctr\" {q(tag)}\n")
        try:
            r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                               capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=self.env())
        finally:
            if made:
                net.rmdirs_up(HOST_BLOB_CACHE, made)
        if r.returncode != 0:
            raise RuntimeError(f"building {tag} with buildah: {r.returncode}\n{r.stderr[-3000:]}")
        shutil.rmtree(rootfs, ignore_errors=True)
        return tag

    def run(self, *args, network, image=IMAGE, timeout=120, check=True):
        """`podman run --rm --pull never --network NETWORK [args] IMAGE ...`: args before `--`
        are options, those after it the command."""
        if "--" in args:
            i = args.index("--")
            opts, cmd = args[:i], args[i + 1:]
        else:
            opts, cmd = (), args
        return self.podman("run", "--pull", "never", "--network", network, *opts, image, *cmd,
                           timeout=timeout, check=check)

    def processes(self):
        """Processes whose command line names the temporary directory, or whose root is in it."""
        out = []
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == os.getpid():
                continue
            try:
                root = os.readlink(f"/proc/{p}/root")
            except OSError:
                root = ""
            if self.tmp in net.cmdline(int(p)) or root.startswith(self.tmp + "/"):
                out.append(int(p))
        return out

    def mounts(self):
        """Mount points under the temporary directory, deepest first."""
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == self.tmp or mp.startswith(self.tmp + "/"):
                    out.append(mp)
        return sorted(out, key=len, reverse=True)


def _isdir(mode):
    return (mode & 0o170000) == 0o040000


def _tree(top, only=None):
    """What is under `top` (paths, kinds, sizes, mtimes of files), to tell whether it changed;
    with `only`, just the entries whose first component below `top` starts so. A directory's
    own mtime is left out: an entry made and removed again is no change."""
    out = []
    if os.path.lexists(top):
        st = os.lstat(top)
        out.append((top, st.st_mode, 0, 0))
    for d, dirs, files in os.walk(top):
        if only and d == top:
            dirs[:] = [n for n in dirs if n.startswith(only)]
            files = [n for n in files if n.startswith(only)]
        for n in sorted(dirs + files):
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if _isdir(st.st_mode):
                out.append((p, st.st_mode, 0, 0))
            else:
                out.append((p, st.st_mode, st.st_size, st.st_mtime_ns))
    return sorted(out)


