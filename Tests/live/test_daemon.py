"""The process: flags, readiness, single instance, SIGTERM."""
import os
import signal
import socket
import subprocess

import pytest

import net
from conftest import BIN, Daemon, unique_name


@pytest.mark.parametrize("args,needle", [
    (["--workers", "0"], "--workers"),
    (["--max-queues", "300"], "--max-queues"),
    (["--listen", "tcp:0.0.0.0:8080"], "loopback"),
    (["--listen", "http://x"], "unix:PATH or tcp:HOST:PORT"),
    (["--bogus"], "bogus"),
])
def test_bad_flags_exit_nonzero_before_starting(args, needle, tmpdir_short):
    sock = os.path.join(tmpdir_short, "api.sock")
    r = subprocess.run([BIN, "--listen", f"unix:{sock}"] + args if args[0] != "--listen" else [BIN] + args,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert needle in r.stderr
    assert not os.path.exists(sock)


def test_sigterm_leaves_no_device_and_no_socket(tmpdir_short):
    d = Daemon(tmpdir_short)
    a, b = unique_name("s"), unique_name("s")
    try:
        assert d.unix.post("/v1/devices", {"name": a, "queues": 4}).status == 201
        assert d.tcp.post("/v1/devices", {"name": b, "queues": 2, "mode": "echo"}).status == 201
        assert net.exists(a) and net.exists(b)
        rc = d.stop(signal.SIGTERM)
        assert rc == 0, d.log
        assert not net.exists(a) and not net.exists(b)
        assert not os.path.exists(d.socket)
        assert not os.path.exists(d.socket + ".lock"), "a clean stop leaves no lock file beside the socket"
        assert any("msg=stopped" in line for line in d.log)
    finally:
        d.stop(signal.SIGKILL)
        net.delete_link(a)
        net.delete_link(b)


def test_sigint_too(tmpdir_short):
    d = Daemon(tmpdir_short, tcp=False)
    assert d.stop(signal.SIGINT) == 0
    assert not os.path.exists(d.socket)


def test_a_live_socket_is_not_taken_over_but_a_stale_one_is(tmpdir_short):
    first = Daemon(tmpdir_short, tcp=False)
    try:
        r = subprocess.run([BIN, "--listen", f"unix:{first.socket}", "--state-dir", os.path.join(tmpdir_short, "s2")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert first.socket in r.stderr and "another mqtapd instance" in r.stderr
        assert first.unix.get("/v1/health").status == 200
    finally:
        assert first.stop() == 0
    # A crash leaves the socket file behind; the next start replaces it.
    s = socket.socket(socket.AF_UNIX)
    s.bind(first.socket)
    s.close()
    assert os.path.exists(first.socket)
    second = Daemon(tmpdir_short, tcp=False)
    try:
        assert second.unix.get("/v1/health").status == 200
    finally:
        assert second.stop() == 0


def test_one_log_line_per_request(daemon, api):
    marker = f"/v1/devices/{unique_name('g')}"
    api.get(marker)
    assert net.settle(lambda: any(f"path={marker} " in line and " status=404" in line for line in daemon.log))
    line = next(l for l in daemon.log if f"path={marker}" in l)
    fields = dict(f.split("=", 1) for f in line.split(" "))
    assert line.startswith("ts=") and fields["level"] == "info" and fields["msg"] == "request"
    assert fields["method"] == "GET" and fields["status"] == "404" and fields["code"] == "not_found"
    assert fields["device"] == marker.rsplit("/", 1)[1] and int(fields["request_id"]) > 0
    assert any(line.startswith("mqtapd: listening on unix:") for line in daemon.log)
    assert any(line.startswith("mqtapd: listening on tcp:127.0.0.1:") for line in daemon.log)


def test_json_log_format(tmpdir_short):
    import json as _json
    d = Daemon(tmpdir_short, "--log-format", "json", tcp=False)
    try:
        d.unix.get("/v1/devices/nothing-here")
        assert net.settle(lambda: any('"path":"/v1/devices/nothing-here"' in l for l in d.log))
    finally:
        assert d.stop() == 0
    records = [_json.loads(l) for l in d.log if l.startswith("{")]
    req = next(r for r in records if r.get("path") == "/v1/devices/nothing-here")
    assert req["msg"] == "request" and req["status"] == "404" and req["device"] == "nothing-here" and req["code"] == "not_found"
    assert all({"ts", "level", "msg"} <= r.keys() for r in records)
    assert any(r["msg"] == "stopped" for r in records)
