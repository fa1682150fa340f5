"""Deployment files: the Kubernetes DaemonSet parses and has what mqtapd needs on a node."""
import os

import yaml

from mqtapd_client import ROOT


def test_daemonset():
    with open(os.path.join(ROOT, "deploy", "kubernetes", "daemonset.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    ds = docs[0]
    assert ds["apiVersion"] == "apps/v1" and ds["kind"] == "DaemonSet"
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (c,) = spec["containers"]
    assert "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]
    assert c["securityContext"].get("privileged") is not True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    tun = next(v for v in volumes.values() if v.get("hostPath", {}).get("path") == "/dev/net/tun")
    assert tun["hostPath"]["type"] == "CharDevice"
    assert mounts[tun["name"]] == "/dev/net/tun"
    run = next(v for v in volumes.values() if v.get("hostPath", {}).get("path") == "/run/mqtapd")
    assert mounts[run["name"]] == "/run/mqtapd"
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["/usr/local/bin/mqtap", "ping"] and "/run/mqtapd/api.sock" in probe
    assert "unix:/run/mqtapd/api.sock" in c["args"]
