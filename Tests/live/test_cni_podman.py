"""A real container runtime drives mqtap-cni (issue 21): Debian's podman 4.3 with its CNI backend
runs a container on a network whose only plugin is `mqtap-cni` (4 queues, mode external, an
owner, host-local IPAM from containernetworking-plugins). Inside the container `eth0` is a
persistent 4-queue multiqueue tap with that owner and an address from the range, its MAC the
one the plugin's Result gave podman; on the host the daemon lists the device in the container's
namespace, with the container's id; `podman rm -f` (DEL) removes it and releases the address,
and so does the end of a `podman run --rm`. A second DEL of a container that is gone, and
VERSION, answer as CNI 1.0.0 says.

podman is a private one (podman_host.py): its storage, configuration, CNI config and plugin
directories are in a temporary directory; the image is built there from scratch (a static
busybox), since no registry is reachable."""
import ipaddress
import json
import os
import subprocess
import tempfile

import pytest

import podman_host
from conftest import BIN, CNI_BIN, Daemon, need, unique_name
from net import IFF_MULTI_QUEUE, IFF_PERSIST, IFF_TAP, IFF_TUN

NETWORK = "mqtnet"
# 198.18.0.0/15 (benchmarking); a /24 no other live test uses.
SUBNET = ipaddress.ip_network("198.18.5.0/24")
QUEUES = 4
OWNER = 107  # KubeVirt's qemu uid: any unprivileged id the kernel takes
IFNAME = "eth0"  # podman's CNI_IFNAME for a container's first network


def cni_device(api, container_id=None):
    """The daemon's devices that a CNI container owns (mqtap-cni labels them with the
    container's id); with `container_id`, only that container's."""
    devices = api.get("/v1/devices").json()["devices"]
    return [d for d in devices if "cni.container_id" in d.get("labels", {})
            and (container_id is None or d["labels"]["cni.container_id"] == container_id)]


def conflist(socket, data_dir):
    return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{
        "type": "mqtap-cni", "socket": socket, "queues": QUEUES, "mode": "external", "owner": OWNER,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": str(SUBNET)}]], "dataDir": data_dir}}]}


def leased_addresses(pod):
    """The addresses host-local holds for the network (a file per address in its dataDir)."""
    d = os.path.join(pod.cni_data, NETWORK)
    out = []
    for n in os.listdir(d) if os.path.isdir(d) else []:
        try:
            out.append(ipaddress.ip_address(n))
        except ValueError:
            pass  # its lock and last_reserved_ip.0
    return out


def need_plugin():
    need(os.access(CNI_BIN, os.X_OK), f"the CNI plugin {CNI_BIN} is missing (build mqtap-cni, or set MQTAP_CNI_BIN)")


@pytest.fixture(scope="module")
def prerequisites():
    need_plugin()
    try:
        podman_host.check_prerequisites()
    except podman_host.Unavailable as e:
        need(False, str(e))


@pytest.fixture(scope="module")
def daemon(prerequisites):
    need(os.access(BIN, os.X_OK), f"{BIN} is missing (build it first)")
    with tempfile.TemporaryDirectory(prefix="mqcni-") as tmp:
        d = Daemon(tmp, tcp=False)
        yield d
        rc = d.stop()
        assert rc == 0, "\n".join(d.log[-20:])


@pytest.fixture(scope="module")
def pod(daemon):
    p = podman_host.Podman(plugins={"mqtap-cni": CNI_BIN}).start()
    try:
        p.network(conflist(daemon.socket, p.cni_data))
        p.build_image()
    except BaseException:
        p.stop()
        raise
    yield p
    problems = p.stop()
    assert not problems, "\n".join(problems)


def inspect(pod, name, fmt):
    return pod.podman("inspect", "--format", fmt, name).stdout.strip()


def plugin(command, env, stdin):
    """Runs the plugin as a runtime would: CNI_* in the environment, the config on stdin."""
    return subprocess.run([CNI_BIN], input=stdin, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CNI_COMMAND=command, **env))


def test_podman_container_gets_a_multiqueue_tap_from_the_daemon(daemon, pod):
    api = daemon.unix
    assert cni_device(api) == []
    name = unique_name("c")
    pod.run("-d", "--name", name, "--", "sleep", "600", network=NETWORK)
    try:
        cid = inspect(pod, name, "{{.Id}}")
        sandbox = inspect(pod, name, "{{.NetworkSettings.SandboxKey}}")
        result_mac = inspect(pod, name, "{{(index .NetworkSettings.Networks \"%s\").MacAddress}}" % NETWORK)
        assert sandbox.startswith("/run/netns/"), sandbox

        # Inside the container: what the kernel says of eth0.
        r = pod.podman("exec", name, "sh", "-c",
                       f"cat /sys/class/net/{IFNAME}/tun_flags /sys/class/net/{IFNAME}/owner "
                       f"/sys/class/net/{IFNAME}/address; ip -o -4 addr show dev {IFNAME}")
        lines = r.stdout.splitlines()
        flags, owner, mac = int(lines[0], 16), int(lines[1]), lines[2].strip()
        assert flags & IFF_TAP and not flags & IFF_TUN, hex(flags)
        assert flags & IFF_MULTI_QUEUE, f"{hex(flags)}: no IFF_MULTI_QUEUE"
        assert flags & IFF_PERSIST, f"{hex(flags)}: not persistent"
        assert owner == OWNER
        assert mac == result_mac, f"eth0 has {mac}, the Result said {result_mac}"
        addrs = [ipaddress.ip_interface(w) for l in lines[3:] for w in l.split() if "/" in w and w[0].isdigit()]
        assert len(addrs) == 1 and addrs[0].ip in SUBNET and addrs[0].network == SUBNET, r.stdout
        assert leased_addresses(pod) == [addrs[0].ip]

        # On the host: the daemon has it, in the container's namespace, with the container's id.
        found = cni_device(api, cid)
        assert len(found) == 1, json.dumps(api.get("/v1/devices").json(), indent=1)
        dev = found[0]
        assert IFNAME in (dev["name"], dev.get("kernel_name")), dev
        assert dev["netns"]["own"] is False, dev
        assert dev["netns"]["inode"] == os.stat(sandbox).st_ino, (dev["netns"], sandbox)
        assert dev["queue_count"] == QUEUES, dev
        assert dev.get("mode") == "external", dev
        got = api.get(f"/v1/devices/{dev['name']}")
        assert got.status == 200 and got.json()["labels"]["cni.container_id"] == cid
        # The kernel's own count (attached + detached), read in the container's namespace.
        link = json.loads(subprocess.run(["nsenter", f"--net={sandbox}", "ip", "-d", "-j", "link", "show", IFNAME],
                                         capture_output=True, text=True, check=True).stdout)[0]
        info = link["linkinfo"]["info_data"]
        assert info.get("numqueues", 0) + info.get("numdisabled", 0) == QUEUES, info
    finally:
        r = pod.podman("rm", "--force", "--time", "0", name, check=False)
    assert r.returncode == 0, r.stderr
    # DEL: the device is gone, from the daemon and the kernel, and the address is free again.
    assert cni_device(api, cid) == []
    assert not os.path.exists(sandbox)
    assert leased_addresses(pod) == []

    # DEL again, as a runtime may (its namespace gone too): success and nothing printed.
    stdin = json.dumps(conflist(daemon.socket, pod.cni_data)["plugins"][0] | {"cniVersion": "1.0.0", "name": NETWORK})
    env = {"CNI_CONTAINERID": cid, "CNI_NETNS": sandbox, "CNI_IFNAME": IFNAME, "CNI_PATH": pod.plugin_dir}
    r = plugin("DEL", env, stdin)
    assert r.returncode == 0 and r.stdout.strip() == "", (r.returncode, r.stdout, r.stderr)


def test_podman_run_rm_removes_the_device(daemon, pod):
    """A one-shot `podman run --rm`: the container sees its tap, and once it ends podman's own
    teardown (DEL) leaves no device and no address behind."""
    api = daemon.unix
    r = pod.run("--rm", "--name", unique_name("r"), "--",
                "sh", "-c", f"cat /sys/class/net/{IFNAME}/tun_flags; ip -o -4 addr show dev {IFNAME}", network=NETWORK)
    flags = int(r.stdout.split()[0], 16)
    assert flags & IFF_TAP and flags & IFF_MULTI_QUEUE, r.stdout
    assert any(w.startswith("198.18.5.") for w in r.stdout.split()), r.stdout
    assert cni_device(api) == []
    assert leased_addresses(pod) == []


def test_version():
    need_plugin()
    r = plugin("VERSION", {}, json.dumps({"cniVersion": "1.0.0"}))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"], out
