"""Host-side helpers for live tests: interfaces, tun ioctls, frames over AF_PACKET, process fds."""
import fcntl
import os
import signal
import socket
import struct
import subprocess
import time

# <linux/if_tun.h>: the ioctls on a /dev/net/tun file and the flags of its `struct ifreq`
# (packed as "16sH22x": the name, the flags).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def exists(name):
    return os.path.exists(f"/sys/class/net/{name}")


def tap_names(prefix):
    """The TUN/TAP devices whose names start with `prefix`: a test's own. (Other processes make
    and delete taps at any time, so a test never compares the host's whole set.)"""
    return {n for n in os.listdir("/sys/class/net")
            if n.startswith(prefix) and os.path.exists(f"/sys/class/net/{n}/tun_flags")}


def held_taps(pid):
    """The names of the TUN/TAP devices process `pid` holds a queue of (the `iff:` line of a tun
    fd's fdinfo), whatever their names."""
    names = set()
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as f:
                for line in f:
                    if line.startswith("iff:"):
                        names.add(line.split(None, 1)[1].strip())
        except OSError:
            pass  # closed meanwhile
    return names


def open_tap(name, flags=IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE):
    """A file of the tap `name`, opened by name (TUNSETIFF) as QEMU with `ifname=` or libvirt
    would: one more queue of a multiqueue device, the one queue of a single-queue one."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def kernel_queue_count(name):
    """The attached queues of the tun device `name` (queue_counts); None if there is none."""
    counts = queue_counts(name)
    return counts and counts[0]


def delete_link(name):
    if exists(name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)


def disable_ipv6(name):
    """No router solicitations or MLD reports of the kernel's own on a test device."""
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("1")


KERNEL_STATS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_dropped")


def kernel_stats(name, netns=None):
    """The kernel's counters of the device `name` (KERNEL_STATS); with `netns`, of the device
    of that name in that named namespace (`ip netns exec` mounts a sysfs of the namespace:
    its counters, not the host's)."""
    paths = [f"/sys/class/net/{name}/statistics/{k}" for k in KERNEL_STATS]
    if netns is None:
        values = []
        for path in paths:
            with open(path) as f:
                values.append(int(f.read()))
    else:
        values = [int(v) for v in sh("ip", "netns", "exec", netns, "cat", *paths).stdout.split()]
    return dict(zip(KERNEL_STATS, values))


def frame(flow, dst_mac, size=60):
    """Ethernet/IPv4/UDP, source port varied by flow so the kernel spreads flows over queues."""
    dst = bytes.fromhex(dst_mac.replace(":", ""))
    src = bytes.fromhex("020000000001")
    ip_len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0, 64, 17, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 1, flow & 0xFF]))
    csum = sum(struct.unpack("!10H", ip))
    while csum > 0xFFFF:
        csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
    udp = struct.pack("!HHHH", 10000 + flow, 5000, size - 34, 0)
    return dst + src + b"\x08\x00" + ip + udp + bytes(size - 42)


def send_frames(ifname, dst_mac, count, flows=64):
    """Sends `count` frames out of `ifname` (into the tap); returns how many the kernel took."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only
    s.bind((ifname, 0))
    frames = [frame(i, dst_mac) for i in range(flows)]
    sent = 0
    try:
        for i in range(count):
            try:
                s.send(frames[i % flows])
                sent += 1
            except OSError:
                pass
    finally:
        s.close()
    return sent


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(fn, timeout=30.0, every=0.02, steady=None):
    """Polls `fn` until it returns something true, and returns that, or its last answer once
    `timeout` has passed (connections close asynchronously). The deadline is long: it costs
    time only when the test fails, and a shared machine stalls. With `steady` (seconds), a
    true answer counts only if `fn` is still true that long after (counters that have
    stopped moving, not two passing each other)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v and steady is not None:
            time.sleep(steady)
            v = fn()
        if v:
            return v
        time.sleep(every)
    return fn()


def sh(*args, check=True):
    """Runs a command, its output captured as text."""
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def queue_counts(name):
    """(attached, detached) queues of the tun device `name`, as the kernel counts them
    (whoever holds them); None if there is no such device."""
    out = subprocess.run(["ip", "-d", "link", "show", "dev", name], capture_output=True, text=True).stdout.split()
    if "numqueues" not in out:
        return None
    return int(out[out.index("numqueues") + 1]), int(out[out.index("numdisabled") + 1])


def pids_in(**namespaces):
    """The processes in any of the given namespaces, by kind (`mnt=`, `net=`: the link
    /proc/PID/ns/KIND reads, as "mnt:[4026531841]")."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if any(os.readlink(f"/proc/{p}/ns/{kind}") == ns for kind, ns in namespaces.items()):
                    pids.append(int(p))
            except OSError:
                pass  # gone meanwhile
    return pids


class Unavailable(Exception):
    """A prerequisite is missing (the caller skips, or fails under CI=true)."""


def installed(pkg):
    """Whether the Debian package `pkg` is installed."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def rmdirs_up(path, top):
    """Removes the empty directories from `path` up to `top` (both included)."""
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def terminate(pid, timeout=10.0):
    """SIGTERM, a bounded wait, then SIGKILL and another; for a process that may not be our
    child (a runtime's daemon, its QEMU or conmon)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive(pid):
            return


def read_lines(path):
    """A file's lines, stripped (a serial console log: CRs dropped); [] while it is not there."""
    try:
        with open(path, errors="replace") as f:
            return [l.strip() for l in f.read().replace("\r", "").split("\n")]
    except FileNotFoundError:
        return []


def cmdline(pid):
    """A process's command line, spaces for NULs; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
