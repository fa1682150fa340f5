"""Property-based fuzzing of every request body, path and query (issue 11, break 1): arbitrary
integers, strings and nesting in every field of every body the spec declares, and the daemon
stays up, answers every request with a response valid against openapi.yaml, and never with a
500 of its own (`internal_error`). A trap anywhere (an overflow, a force unwrap) ends the
process: the next request fails and the test with it."""
import json
import os
import tempfile
import urllib.parse

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from conftest import Daemon, PREFIX, unique_name
from mqtapd_client import SPEC, SpecViolation, validate
import net
import rawhttp

SETTINGS = settings(max_examples=int(os.environ.get("MQTAPD_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=list(HealthCheck), database=None,
                    # No shrinking: a failure here is a hung or dead daemon, and each try of a
                    # smaller example would wait for the client's timeout again.
                    phases=(Phase.explicit, Phase.generate))

# Numbers where arithmetic breaks: the edges of Int64, UInt64 and Int32, and the API's own.
EDGES = [0, -1, 1, 2**31 - 1, 2**31, -2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64 - 1,
         2**64, 10**30, 255, 256, 257, 65535, 65536, 67, 68, 1500, 9000, 65521]
scalars = (st.none() | st.booleans() | st.sampled_from(EDGES) | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24)
           | st.sampled_from(["", "0", "1e400", "-0", "\u0000", "tap", "tun", "sink", "echo", "forward",
                              "aa:bb:cc:dd:ee:ff", "ff:ff:ff:ff:ff:ff", "01:00:00:00:00:00", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def valid_ifname(s):
    return isinstance(s, str) and 0 < len(s.encode()) < 16 and s not in (".", "..") \
        and not any(c in s for c in "/:") and not any(c.isspace() for c in s)


# A name the kernel would take is one of ours (so that nothing outside the prefix is made).
names = st.one_of(st.builds(lambda: unique_name("z")), values.filter(lambda v: not valid_ifname(v)))


def body_schema(path, method):
    def resolve(s):
        while "$ref" in s:
            s = SPEC["components"]["schemas"][s["$ref"].rsplit("/", 1)[1]]
        return s
    return resolve(SPEC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"])


def bodies(path, method, base):
    """A valid body with one field replaced, one field added, or anything at all."""
    fields = list(body_schema(path, method).get("properties", {}))

    @st.composite
    def one_field(draw):
        b = dict(base())
        f = draw(st.sampled_from(fields))
        b[f] = draw(names if f in ("name", "peer") else values)
        return b

    @st.composite
    def extra_field(draw):
        b = dict(base())
        b[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields))] = draw(values)
        return b

    @st.composite
    def fields_only(draw):
        # Every declared field at once, with values drawn for each: the combinations.
        b = {f: draw(names if f in ("name", "peer") else values) for f in fields if draw(st.booleans())}
        if "name" in fields:
            b["name"] = draw(names)
        return b

    whole = values.filter(lambda v: not isinstance(v, dict) or "name" not in v or not valid_ifname(v["name"]))
    return st.one_of(one_field(), extra_field(), fields_only(), whole)


@pytest.fixture(scope="module")
def fuzzed():
    with tempfile.TemporaryDirectory(prefix="mqfz-") as tmp:
        d = Daemon(tmp, tcp=False)
        target = unique_name("fz")
        peer = unique_name("fp")
        assert d.unix.post("/v1/devices", {"name": target, "queues": 2}).status == 201
        assert d.unix.post("/v1/devices", {"name": peer, "queues": 2}).status == 201
        yield d, target
        alive = d.proc.poll() is None
        if alive:
            for dev in d.unix.get("/v1/devices").json()["devices"]:
                d.unix.delete(f"/v1/devices/{urllib.parse.quote(dev['name'], safe='')}?force=true", check=False)
        rc = d.stop()
        for n in net.tap_names(PREFIX):
            net.delete_link(n)
        assert alive, "the daemon died:\n" + "\n".join(d.log[-20:])
        assert rc == 0, "\n".join(d.log[-20:])


def send(d, method, path, body, raw=False):
    data = body if raw else json.dumps(body, allow_nan=False)
    if os.environ.get("MQTAPD_FUZZ_LOG"):
        with open(os.environ["MQTAPD_FUZZ_LOG"], "a") as f:
            f.write(f"{method} {path} {data!r:.300}\n")
    try:
        r = d.unix.request(method, path, data)  # checked against the spec by the client
    except SpecViolation as e:
        raise SpecViolation(f"{e} (sent {method} {path} {data!r:.200})") from None
    assert d.proc.poll() is None, f"{method} {path} {data!r:.200} killed the daemon:\n" + "\n".join(d.log[-20:])
    code = r.json()["error"]["code"] if r.status >= 400 and r.body else None
    assert r.status < 500 or code in ("kernel_error", "resource_exhausted"), (method, path, data, r.status, r.body)
    return r


def test_create_bodies(fuzzed):
    d, _ = fuzzed

    @SETTINGS
    @given(bodies("/v1/devices", "post", lambda: {"name": unique_name("z"), "queues": 1}))
    def run(body):
        r = send(d, "POST", "/v1/devices", body)
        if r.status == 201:
            assert r.json()["name"].startswith(PREFIX)
            send(d, "DELETE", f"/v1/devices/{r.json()['name']}?force=true", None, raw=True)
    run()


def test_update_bodies(fuzzed):
    d, target = fuzzed

    @SETTINGS
    @given(bodies("/v1/devices/{name}", "patch", lambda: {"up": True}))
    def run(body):
        send(d, "PATCH", f"/v1/devices/{target}", body)
    run()


def test_add_queue_bodies(fuzzed):
    d, target = fuzzed

    @SETTINGS
    @given(bodies("/v1/devices/{name}/queues", "post", lambda: {"count": 1}))
    def run(body):
        r = send(d, "POST", f"/v1/devices/{target}/queues", body)
        if r.status == 201:
            for q in r.json()["queues"]:
                send(d, "DELETE", f"/v1/devices/{target}/queues/{q['id']}", None, raw=True)
    run()


def test_queue_and_limit_bodies(fuzzed):
    d, target = fuzzed

    @SETTINGS
    @given(bodies("/v1/devices/{name}/queues/{id}", "patch", lambda: {"enabled": True}),
           bodies("/v1/limits", "put", lambda: {"max_queues": 256}))
    def run(queue_body, limit_body):
        send(d, "PATCH", f"/v1/devices/{target}/queues/0", queue_body)
        send(d, "PUT", "/v1/limits", limit_body)
    run()
    send(d, "PUT", "/v1/limits", {"max_queues": 256})


def take_lease(d, device, data):
    """A lease request as a VMM sends it (with the upgrade), on a raw socket: a 101 is closed
    at once (the lease ends with it); any other answer is read whole and checked."""
    path = f"/v1/devices/{device}/leases"
    with rawhttp.connect(d.socket, timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: mqtapd-lease/1\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head, body = rawhttp.read_head(s)
        status, headers = rawhttp.parse_head(head)
        if status != 101:
            body = rawhttp.read_body(s, headers, body)
            validate("POST", path, status, headers, body)
    assert d.proc.poll() is None, f"POST {path} {data!r:.200} killed the daemon:\n" + "\n".join(d.log[-20:])
    assert status == 101 or 400 <= status < 500, (data, status, body)
    return status


def test_lease_bodies(fuzzed):
    # With the upgrade a VMM asks for, so that the body is parsed: a valid one is a 101.
    d, target = fuzzed
    statuses = set()

    @SETTINGS
    @given(bodies("/v1/devices/{name}/leases", "post", lambda: {"queues": [0]}))
    def run(body):
        statuses.add(take_lease(d, target, json.dumps(body, allow_nan=False).encode()))
    run()
    assert 400 in statuses, "some bodies were refused for what they said"


segments = st.one_of(st.text(max_size=40), st.sampled_from([str(e) for e in EDGES]),
                     st.sampled_from(["..", ".", "%00", "%2F", "a/b", "0x10", "+1", "-0", "1.5", "１"]))


def test_paths_and_queries(fuzzed):
    d, target = fuzzed

    @SETTINGS
    @given(st.sampled_from(["GET", "DELETE", "PATCH", "POST", "PUT"]), segments, segments,
           st.sampled_from(["", "/queues", "/queues/{q}", "/stats", "/leases", "/leases/{q}"]),
           st.dictionaries(st.sampled_from(["force", "since", "device", "follow", "x"]), segments, max_size=3))
    def run(method, name, q, tail, query):
        if method == "DELETE" and name == target:
            name = name + "x"
        path = "/v1/devices/" + urllib.parse.quote(name, safe="") + tail.replace("{q}", urllib.parse.quote(q, safe=""))
        qs = urllib.parse.urlencode(query)
        send(d, method, path + ("?" + qs if qs else ""), {} if method in ("PATCH", "POST", "PUT") else None,
             raw=method not in ("PATCH", "POST", "PUT"))
        if query:
            # follow=false: a stream (the default) would not end.
            send(d, "GET", "/v1/events?" + urllib.parse.urlencode(dict(query, follow="false")), None, raw=True)
    run()


# Each under the 64 KiB body limit, so the parser sees it (a larger one is 413 before it is read,
# and the client may then find the connection closed under its send).
@pytest.mark.parametrize("raw", [
    b"[" * 60000, b"{" * 5000, b'{"count":' * 3000, b'{"count":9223372036854775807}', b'{"count":1e400}',
    b'{"count":-9223372036854775808}', b'{"count":18446744073709551616}', b'{"count":1.0}', b'{"count":-0}',
    b'{"count":1,"count":2}', b'{"count":"\\u0000"}', b'{"\\u0000":1}', b'\xff\xfe{"count":1}', b'{"count":1}\x00',
    b'{"count":1} {"count":1}', b"null", b"nan", b'"' + b"a" * 60000 + b'"',
], ids=lambda raw: f"{len(raw)}B-{raw[:12]!r}")
def test_raw_bodies(fuzzed, raw):
    d, target = fuzzed
    for method, path in [("POST", f"/v1/devices/{target}/queues"), ("POST", "/v1/devices"),
                         ("PATCH", f"/v1/devices/{target}"), ("PUT", "/v1/limits")]:
        r = send(d, method, path, raw, raw=True)
        assert r.status in (400, 413), (method, path, raw[:40], r.status, r.body)
