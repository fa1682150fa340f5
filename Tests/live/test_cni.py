"""mqtap-cni driven by hand as a runtime would (CNI spec 1.0.0): the CNI_* environment and the
network config on stdin, against a live daemon and a namespace the test made; the result's
shape, IPAM delegated to Debian's host-local, DEL idempotent, CHECK, VERSION, STATUS, GC and
the error object for bad environments and configs."""
import json
import os
import subprocess

import pytest

from conftest import CNI_BIN, Daemon, need, unique_name

CNI_PATH = "/usr/lib/cni"


@pytest.fixture
def setup(tmpdir_short):
    need(os.access(CNI_BIN, os.X_OK), f"no plugin at {CNI_BIN}")
    need(os.access(os.path.join(CNI_PATH, "host-local"), os.X_OK), "no host-local (containernetworking-plugins)")
    ns = unique_name("cn")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    d = Daemon(tmpdir_short, tcp=False)
    try:
        yield d, ns, tmpdir_short
    finally:
        rc = d.stop()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        assert rc == 0


def config(d, tmp, **extra):
    c = {"cniVersion": "1.0.0", "name": "mqtest", "type": "mqtap-cni", "socket": d.socket, "queues": 2,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.6.0/24"}]], "dataDir": os.path.join(tmp, "ipam"),
                  "routes": [{"dst": "198.19.0.0/16"}]}}
    c.update(extra)
    return c


def plugin(command, conf, **env):
    base = {"CNI_COMMAND": command, "CNI_PATH": CNI_PATH, "PATH": os.environ["PATH"]}
    base.update(env)
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    r = subprocess.run([CNI_BIN], input=stdin, capture_output=True, text=True, timeout=60, env=base)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    return r.returncode, out, r.stderr


def test_add_check_del(setup):
    d, ns, tmp = setup
    path = f"/run/netns/{ns}"
    env = {"CNI_CONTAINERID": "abc123", "CNI_NETNS": path, "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1"}
    rc, res, err = plugin("ADD", config(d, tmp, owner=107), **env)
    assert rc == 0, (res, err)
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"] == [{"name": "eth0", "mac": res["interfaces"][0]["mac"], "sandbox": path}]
    assert len(res["ips"]) == 1 and res["ips"][0]["address"].startswith("198.18.6.") and res["ips"][0]["interface"] == 0
    assert res["routes"] == [{"dst": "198.19.0.0/16"}]
    # The interface in the namespace: a persistent multiqueue tap, its address and route.
    link = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", "dev", "eth0"], capture_output=True, text=True)
    info = json.loads(link.stdout)[0]
    assert info["address"] == res["interfaces"][0]["mac"]
    assert "UP" in info["flags"]
    addr = subprocess.run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    assert res["ips"][0]["address"] in addr
    route = subprocess.run(["ip", "-n", ns, "route", "show", "198.19.0.0/16"], capture_output=True, text=True).stdout
    assert "via 198.18.6.1" in route, route
    # The daemon has it, labelled with the container.
    devs = [x for x in d.unix.get("/v1/devices").json()["devices"] if x.get("labels", {}).get("cni.container_id") == "abc123"]
    assert len(devs) == 1
    dev = devs[0]
    assert dev["kernel_name"] == "eth0" and dev["persist"] and dev["mode"] == "external" and dev["queue_count"] == 2
    assert dev["owner"] == 107 and dev["netns"]["name"] == ns and dev["labels"]["cni.network"] == "mqtest"
    # CHECK: with the result, fine; with a config that asks for more queues, refused.
    rc, out, err = plugin("CHECK", config(d, tmp, owner=107, prevResult=res), **env)
    assert rc == 0 and out is None, (out, err)
    rc, out, _ = plugin("CHECK", config(d, tmp, owner=107, queues=4, prevResult=res), **env)
    assert rc != 0 and out["code"] == 100 and "queue_count" in out["details"], out
    rc, out, _ = plugin("CHECK", config(d, tmp, owner=107), **env)
    assert rc != 0 and "prevResult" in out["msg"], out
    # A second ADD for the same container and interface is refused, and changes nothing.
    rc, out, _ = plugin("ADD", config(d, tmp), **env)
    assert rc != 0 and out["code"] == 100 and "name_conflict" in out["msg"], out
    # DEL: the device and its address go; a second DEL is fine too.
    for _ in range(2):
        rc, out, err = plugin("DEL", config(d, tmp, prevResult=res), **env)
        assert rc == 0 and out is None, (out, err)
    assert not any(x.get("labels", {}).get("cni.container_id") == "abc123" for x in d.unix.get("/v1/devices").json()["devices"])
    assert subprocess.run(["ip", "-n", ns, "link", "show", "dev", "eth0"], capture_output=True).returncode != 0
    assert not [f for f in os.listdir(os.path.join(tmp, "ipam", "mqtest")) if f.startswith("198.")]
    # DEL of a namespace that is gone, or without one, is success.
    rc, out, _ = plugin("DEL", config(d, tmp), **dict(env, CNI_NETNS="/run/netns/no-such-ns"))
    assert rc == 0, out
    rc, out, _ = plugin("DEL", config(d, tmp), **dict(env, CNI_NETNS=""))
    assert rc == 0, out


def test_version_status_gc_and_errors(setup):
    d, ns, tmp = setup
    path = f"/run/netns/{ns}"
    env = {"CNI_CONTAINERID": "gc1", "CNI_NETNS": path, "CNI_IFNAME": "net1"}
    rc, out, _ = plugin("VERSION", "{}", CNI_PATH="dummy")
    assert rc == 0 and "1.0.0" in out["supportedVersions"], out
    rc, out, _ = plugin("STATUS", config(d, tmp, cniVersion="1.1.0"))
    assert rc == 0, out
    rc, out, _ = plugin("STATUS", config(d, tmp, cniVersion="1.1.0", socket="/nonexistent.sock"))
    assert rc != 0 and out["code"] == 50, out
    # GC: devices of the network whose attachment is not listed go.
    rc, res, err = plugin("ADD", config(d, tmp), **env)
    assert rc == 0, (res, err)
    has = lambda: any(x.get("labels", {}).get("cni.container_id") == "gc1" for x in d.unix.get("/v1/devices").json()["devices"])
    keep = config(d, tmp, cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "gc1", "ifname": "net1"}]})
    assert plugin("GC", keep)[0] == 0 and has()
    # Without the list, nothing is known to be stale: nothing goes.
    assert plugin("GC", config(d, tmp, cniVersion="1.1.0"))[0] == 0 and has()
    assert plugin("GC", config(d, tmp, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))[0] == 0
    assert not any(x.get("labels", {}).get("cni.container_id") == "gc1" for x in d.unix.get("/v1/devices").json()["devices"])
    # Errors: the spec's codes, in its error object on stdout.
    cases = [
        ({}, config(d, tmp), 4, "CNI_CONTAINERID"),                            # missing environment
        (env, "{not json", 6, None),                                           # undecodable config
        (env, config(d, tmp, cniVersion="0.3.1"), 1, "incompatible"),          # a version it does not speak
        (env, config(d, tmp, queues=0), 7, None),                              # invalid config
        (env, config(d, tmp, multi_queue=False, queues=2), 7, None),
        (env, config(d, tmp, mode="forward"), 7, None),
        (dict(env, CNI_IFNAME="bad name"), config(d, tmp), 4, None),
        (env, config(d, tmp, socket="/nonexistent.sock"), 11, None),           # daemon not there: try again later
        (dict(env, CNI_NETNS="/run/netns/no-such-ns"), config(d, tmp), 3, None),
    ]
    for e, conf, code, text in cases:
        rc, out, err = plugin("ADD", conf, **e)
        assert rc != 0 and out["code"] == code, (e, conf, out, err)
        assert out["cniVersion"] and out["msg"]
        if text:
            assert text in out["msg"] + out.get("details", ""), out
    # Nothing was left by the refusals.
    assert [x for x in d.unix.get("/v1/devices").json()["devices"] if "cni.container_id" in x.get("labels", {})] == []
