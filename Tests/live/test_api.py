"""Every endpoint and every error code of the contract, against the live daemon. Every response
is validated against openapi.yaml by the client."""
import json
import os
import socket
import subprocess

import net
import rawhttp
from conftest import PREFIX
from mqtapd_client import SPEC_PATH


def test_health_over_unix_and_tcp(daemon):
    for client in (daemon.unix, daemon.tcp):
        r = client.get("/v1/health")
        assert r.status == 200
        assert r.json()["status"] == "ok"


def test_socket_mode_is_0660(daemon):
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660


def test_openapi_yaml_is_served(api):
    r = api.get("/openapi.yaml")
    assert r.status == 200
    assert r.body == open(SPEC_PATH, "rb").read()


def test_create_get_list_delete(api, name):
    n = name()
    r = api.post("/v1/devices", {"name": n, "queues": 4})
    assert r.status == 201, r
    assert r.headers["location"] == f"/v1/devices/{n}"
    d = r.json()
    assert d["queue_count"] == 4 and d["enabled_queues"] == 4
    assert [q["id"] for q in d["queues"]] == [0, 1, 2, 3]
    assert d["ifindex"] == int(open(f"/sys/class/net/{n}/ifindex").read())
    assert net.kernel_queue_count(n) == 4
    # Counters move as the kernel sends its own IPv6 traffic on an up device; the rest must not.
    def shape(x):
        return {**x, "queues": [{**q, "counters": None} for q in x["queues"]]}
    assert shape(api.get(f"/v1/devices/{n}").json()) == shape(d)
    assert n in [x["name"] for x in api.get("/v1/devices").json()["devices"]]
    r = api.delete(f"/v1/devices/{n}")
    assert r.status == 204 and r.body == b""
    assert not net.exists(n)
    assert api.get(f"/v1/devices/{n}").code == "not_found"
    assert api.delete(f"/v1/devices/{n}").status == 404


def test_patch_device(api, name):
    n = name()
    api.post("/v1/devices", {"name": n, "queues": 2, "up": False})
    r = api.patch(f"/v1/devices/{n}", {"up": True, "mtu": 1400, "mode": "echo", "max_queues": 8})
    assert r.status == 200, r
    d = r.json()
    assert (d["up"], d["mtu"], d["mode"], d["max_queues"]) == (True, 1400, "echo", 8)
    assert int(open(f"/sys/class/net/{n}/mtu").read()) == 1400
    assert api.patch(f"/v1/devices/{n}", {"max_queues": 1}).code == "limit_below_usage"
    assert api.patch(f"/v1/devices/{n}", {"mtu": 10}).code == "invalid_field"
    assert api.patch(f"/v1/devices/{n}", {"speed": 10}).code == "unknown_field"
    # A create-only field is known: said so, naming it.
    for field, value in (("mac", "02:00:00:00:00:09"), ("vnet_hdr", True), ("owner", 0)):
        r = api.patch(f"/v1/devices/{n}", {field: value})
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == field, r
        assert "set at create only" in r.json()["error"]["message"]
    # forward without a peer: the same answer as at create.
    for r in (api.patch(f"/v1/devices/{n}", {"mode": "forward"}), api.post("/v1/devices", {"name": "x0", "mode": "forward"})):
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "peer", r
    api.delete(f"/v1/devices/{n}")


def test_queues_add_detach_remove(api, name):
    n = name()
    api.post("/v1/devices", {"name": n, "queues": 2})
    r = api.post(f"/v1/devices/{n}/queues", {"count": 2})
    assert r.status == 201
    assert [q["id"] for q in r.json()["queues"]] == [2, 3]
    assert net.kernel_queue_count(n) == 4
    assert api.post(f"/v1/devices/{n}/queues").json()["queues"][0]["id"] == 4  # no body: one queue
    r = api.patch(f"/v1/devices/{n}/queues/1", {"enabled": False})
    assert r.status == 200 and r.json()["enabled"] is False
    assert net.kernel_queue_count(n) == 4
    assert api.get(f"/v1/devices/{n}").json()["enabled_queues"] == 4
    assert api.patch(f"/v1/devices/{n}/queues/1", {"enabled": True}).json()["enabled"] is True
    assert api.delete(f"/v1/devices/{n}/queues/0").status == 204
    assert [q["id"] for q in api.get(f"/v1/devices/{n}/queues").json()["queues"]] == [1, 2, 3, 4]
    assert api.post(f"/v1/devices/{n}/queues").json()["queues"][0]["id"] == 0  # smallest free id
    assert api.get(f"/v1/devices/{n}/queues/9").code == "not_found"
    assert api.get(f"/v1/devices/{n}/queues/abc").code == "not_found"
    assert api.patch(f"/v1/devices/{n}/queues/1", {}).code == "invalid_field"
    api.delete(f"/v1/devices/{n}")


def test_last_queue(api, name):
    n = name()
    api.post("/v1/devices", {"name": n, "queues": 1})
    r = api.delete(f"/v1/devices/{n}/queues/0")
    assert r.status == 409 and r.code == "last_queue"
    assert net.kernel_queue_count(n) == 1
    api.delete(f"/v1/devices/{n}")


def test_queue_limit_at_256_and_at_a_lowered_limit(daemon, api, name):
    n = name()
    fds = net.open_fds(daemon.pid)
    assert api.post("/v1/devices", {"name": n, "queues": 256}).status == 201
    r = api.post(f"/v1/devices/{n}/queues")
    assert r.status == 409 and r.code == "queue_limit_exceeded" and r.json()["error"]["field"] == "count", r
    assert net.kernel_queue_count(n) == 256
    # Outside the schema (1..256) is a malformed value, not a state conflict.
    r = api.post("/v1/devices", {"name": name(), "queues": 257})
    assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "queues", r
    r = api.post(f"/v1/devices/{n}/queues", {"count": 9223372036854775807})
    assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "count", r
    assert net.kernel_queue_count(n) == 256
    assert api.delete(f"/v1/devices/{n}").status == 204
    assert net.settle(lambda: net.open_fds(daemon.pid) <= fds), "the 256 queue fds are closed"

    m = name()
    api.post("/v1/devices", {"name": m, "queues": 3})
    try:
        r = api.put("/v1/limits", {"max_queues": 2})
        assert r.status == 409 and r.code == "limit_below_usage" and r.json()["error"]["field"] == "max_queues"
        r = api.put("/v1/limits", {"max_queues": 4})
        assert r.status == 200 and r.json()["max_queues"] == 4
        assert api.get(f"/v1/devices/{m}").json()["max_queues"] == 4
        assert api.post(f"/v1/devices/{m}/queues").status == 201
        r = api.post(f"/v1/devices/{m}/queues")
        assert r.code == "queue_limit_exceeded"
        assert net.kernel_queue_count(m) == 4
        assert api.post("/v1/devices", {"name": name(), "queues": 5}).code == "queue_limit_exceeded"
        r = api.post("/v1/devices", {"name": name(), "max_queues": 5})
        assert r.code == "queue_limit_exceeded" and r.json()["error"]["field"] == "max_queues"
    finally:
        api.delete(f"/v1/devices/{m}")
        assert api.put("/v1/limits", {"max_queues": 256}).status == 200


def test_limits(daemon, api):
    l = api.get("/v1/limits").json()
    assert l["kernel_max_queues"] == 256
    assert l["open_files"] == net.open_fds(daemon.pid) or abs(l["open_files"] - net.open_fds(daemon.pid)) <= 2
    assert l["open_files_limit"] > 0
    assert api.put("/v1/limits", {"max_queues": 0}).code == "invalid_field"
    assert api.put("/v1/limits", {"max_queues": 257}).code == "invalid_field"
    assert api.put("/v1/limits", {"max_queues": "8"}).code == "invalid_field"
    assert api.put("/v1/limits", {}).code == "invalid_field"


def _ours(daemon):
    """The taps this run could have made: those with its prefix, and any the daemon holds a queue
    of (whatever the name). Never the host's others: they come and go as other processes like."""
    return net.tap_names(PREFIX) | net.held_taps(daemon.pid)


def _created_nothing(daemon, before):
    return _ours(daemon) == before


def test_malformed_json_and_duplicate_keys(daemon, api, name):
    before = _ours(daemon)
    r = api.post("/v1/devices", '{"name": "x",\n "queues": }')
    assert r.status == 400 and r.code == "invalid_json"
    assert "line 2" in r.json()["error"]["message"]
    r = api.post("/v1/devices", '{"name": "%s", "name": "%s"}' % (name(), name()))
    assert r.status == 400 and r.code == "invalid_json" and "duplicate" in r.json()["error"]["message"]
    assert api.post("/v1/devices", "[]").code == "invalid_json"
    assert api.post("/v1/devices", "").code == "invalid_json"
    assert _created_nothing(daemon, before)


def test_unknown_field_and_wrong_types(daemon, api, name):
    before = _ours(daemon)
    r = api.post("/v1/devices", {"name": name(), "colour": "red"})
    assert r.status == 400 and r.code == "unknown_field" and r.json()["error"]["field"] == "colour"
    for field, value in [("queues", "4"), ("queues", 1.5), ("persist", 1), ("type", "bridge"),
                         ("mode", "bounce"), ("mac", "nope"), ("mtu", 20), ("queues", 0)]:
        r = api.post("/v1/devices", {"name": name(), field: value})
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == field, (field, r)
    assert _created_nothing(daemon, before)


def test_bad_names_create_nothing(daemon, api):
    before = _ours(daemon)
    for bad in ["", "a" * 16, "tap%d", "a/b", "a b", " lead", "9lives", "é"]:
        r = api.post("/v1/devices", {"name": bad})
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "name", (bad, r)
    assert _created_nothing(daemon, before)
    assert not any(n.startswith("tap") and n[3:].isdigit() for n in _ours(daemon) - before)


def test_nul_in_a_string_is_refused_by_its_field(daemon, api, name):
    """\u0000 in a string is valid JSON: it is refused by the field it is in, not as a parse
    error with the JSON library's words; and never cut short into another name (schemathesis
    found `{"peer": "N...\u0000..."}` answered `invalid_json`)."""
    before = _ours(daemon)
    n = name()
    for field, body in [("name", {"name": n + "\u0000x"}),
                        ("name", {"name": n[:4] + "\u0000"}),
                        ("peer", {"name": n, "mode": "forward", "peer": "N\u0000wm"}),
                        ("peer", {"name": n, "mode": "forward", "peer": "no such/peer"})]:
        r = api.post("/v1/devices", body)  # json.dumps writes the NUL as \u0000
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == field, (body, r)
    assert _created_nothing(daemon, before)
    assert api.post("/v1/devices", {"name": n}).status == 201
    try:
        r = api.patch(f"/v1/devices/{n}", '{"peer": "a\\u0000b"}')
        assert r.status == 400 and r.code == "invalid_field" and r.json()["error"]["field"] == "peer", r
        # A key cannot hold a NUL, even for jansson with JSON_ALLOW_NUL: that stays a parse error.
        assert api.patch(f"/v1/devices/{n}", '{"pe\\u0000er": "x"}').code == "invalid_json"
    finally:
        assert api.delete(f"/v1/devices/{n}").status == 204


def test_name_conflict_with_a_non_tap_interface(api, name):
    r = api.post("/v1/devices", {"name": "lo"})
    assert r.status == 409 and r.code == "name_conflict" and r.json()["error"]["errno"] == "EBUSY"
    veth = name("v")
    peer = name("p")
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer], check=True)
    try:
        r = api.post("/v1/devices", {"name": veth, "queues": 2})
        assert r.status == 409 and r.code == "name_conflict"
        assert not os.path.exists(f"/sys/class/net/{veth}/tun_flags")
    finally:
        net.delete_link(veth)
    n = name()
    api.post("/v1/devices", {"name": n})
    assert api.post("/v1/devices", {"name": n}).code == "name_conflict"
    api.delete(f"/v1/devices/{n}")


def test_wrong_method_and_content_type(daemon, api, name):
    r = api.request("DELETE", "/v1/limits")
    assert r.status == 405 and r.code == "method_not_allowed" and r.headers["allow"] == "GET, HEAD, PUT"
    assert api.request("PUT", "/v1/devices").headers["allow"] == "GET, HEAD, POST"
    before = _ours(daemon)
    r = api.post("/v1/devices", json.dumps({"name": name()}), content_type="text/plain")
    assert r.status == 415 and r.code == "unsupported_media_type"
    r = api.post("/v1/devices", json.dumps({"name": name()}), content_type=None)
    assert r.status == 415
    assert _created_nothing(daemon, before)


def test_unknown_paths(api):
    for path in ["/", "/v1", "/v2/devices", "/v1/devices/x/nothing", "/v1/devices/x/queues/1/y"]:
        r = api.get(path)
        assert r.status == 404 and r.code == "not_found", path


def test_one_mib_body_is_refused_and_the_server_still_answers(daemon, api):
    body = b'{"name":"' + b"a" * (1 << 20) + b'"}'
    try:
        r = api.post("/v1/devices", body)
        assert r.status == 413 and r.code == "payload_too_large"
    except (ConnectionError, socket.timeout, OSError):
        pass  # closing the connection is allowed too
    # A body sent without Content-Length (chunked) is cut off at the limit as well.
    s = rawhttp.connect(daemon.socket, timeout=10)
    s.sendall(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 65536
    got = b""
    try:
        for _ in range(32):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
    try:
        got = s.recv(4096)
    except OSError:
        pass
    s.close()
    assert got == b"" or got.startswith(b"HTTP/1.1 413"), got[:100]
    assert api.get("/v1/health").status == 200


def test_metrics(api, name):
    n = name()
    api.post("/v1/devices", {"name": n, "queues": 2})
    r = api.get("/metrics")
    text = r.body.decode()
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert f'mqtapd_queue_rx_packets_total{{device="{n}",queue="1"}} ' in text
    assert f'mqtapd_device_queues{{device="{n}"}} 2' in text
    assert "mqtapd_build_info{" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    api.delete(f"/v1/devices/{n}")


def test_idle_and_slow_clients_do_not_block_others(daemon, api):
    """Slowloris: many connections that send half a request and stall; others are served."""
    stalled = []
    try:
        for i in range(64):
            s = rawhttp.connect(daemon.socket)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            stalled.append(s)
        for _ in range(20):
            assert api.get("/v1/health").status == 200
        assert daemon.tcp.get("/v1/limits").status == 200
    finally:
        for s in stalled:
            s.close()


def test_head_is_answered_wherever_get_is(daemon, api, name):
    """HEAD: GET's status and headers, no body; the events stream answers at once."""
    n = name()
    assert api.post("/v1/devices", {"name": n}).status == 201
    for path, status in (("/v1/health", 200), ("/metrics", 200), (f"/v1/devices/{n}", 200), ("/v1/events", 200),
                         ("/openapi.yaml", 200), ("/v1/devices/nosuch0", 404)):
        with rawhttp.connect(daemon.socket, timeout=10) as s:
            s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head, body = rawhttp.read_head(s)
            while got := s.recv(65536):  # to the close: a HEAD answer has no body
                body += got
        assert head.startswith(f"HTTP/1.1 {status}".encode()), (path, head)
        assert body == b"", (path, body[:100])
    r = api.request("DELETE", "/v1/health")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert api.delete(f"/v1/devices/{n}").status == 204


def test_a_bare_query_key_takes_the_default_and_a_repeated_header_its_first_value(daemon, api, name):
    """`?force` without a value is absent (its default applies), as it was before the transport
    passed every value through; of a header sent twice, the first counts (either order)."""
    n = name()
    body = json.dumps({"name": n}).encode()

    def create(first, second):
        return rawhttp.exchange(daemon.socket, (
            f"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: {first}\r\nContent-Type: {second}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    status, _, answer, _ = create("text/plain", "application/json")
    assert status == 415, answer
    status, _, answer, _ = create("application/json", "text/plain")
    assert status == 201, answer
    assert api.get("/v1/events?since&follow=false").status == 200
    assert api.request("DELETE", f"/v1/devices/{n}?force").status == 204
    assert not net.exists(n)
