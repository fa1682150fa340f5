"""A lease client as a VMM would write one: POST …/leases upgraded to mqtapd-lease/1 on the
Unix socket, then the line and its fds read with recvmsg (socket.recv_fds)."""
import fcntl
import json
import os
import select
import socket
import struct

from mqtapd_client import _REGISTRY, Response, validate
import jsonschema

import net
import rawhttp


class Lease:
    def __init__(self, sock, line, fds):
        self.sock = sock
        self.line = line
        self.fds = fds

    @property
    def id(self):
        return self.line["lease"]

    def close(self):
        """Releases the lease: the connection and every fd this process holds of it."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


def take(socket_path, device, body=None, headers=None):
    """Returns a Lease, or the refusal as a Response (checked against the spec)."""
    s = rawhttp.connect(socket_path, timeout=10)
    payload = b"" if body is None else json.dumps(body).encode()
    h = {"Host": "localhost", "Connection": "Upgrade", "Upgrade": "mqtapd-lease/1"} if headers is None else headers
    if body is not None:
        h["Content-Type"] = "application/json"
    h["Content-Length"] = str(len(payload))
    head = f"POST /v1/devices/{device}/leases HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    s.sendall(head.encode() + payload)
    raw, fds = b"", []
    while True:
        data, got, _, _ = socket.recv_fds(s, 65536, 253)
        fds += got
        if not data:
            break
        raw += data
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            continue
        status, headers_out = rawhttp.parse_head(raw[:end])
        if status != 101:
            # A refusal: an ordinary response, complete once its body has come.
            if rawhttp.complete(raw):
                break
            continue
        nl = raw.find(b"\n", end + 4)
        if nl >= 0:
            validate("POST", f"/v1/devices/{device}/leases", 101, headers_out, b"")
            assert headers_out.get("upgrade") == "mqtapd-lease/1", headers_out
            line = json.loads(raw[end + 4:nl])
            jsonschema.Draft202012Validator({"$ref": "spec.json#/components/schemas/LeaseLine"},
                                            registry=_REGISTRY).validate(line)
            assert len(fds) == len(line["queues"]), (line, fds)
            return Lease(s, line, fds)
    s.close()
    for fd in fds:
        os.close(fd)
    status, headers_out, body_bytes = rawhttp.split(raw)
    if "content-length" in headers_out:
        body_bytes = body_bytes[:int(headers_out["content-length"])]
    validate("POST", f"/v1/devices/{device}/leases", status, headers_out, body_bytes)
    return Response(status, headers_out, body_bytes)


def getiff(fd):
    """(name, flags) a tun fd is bound to (TUNGETIFF)."""
    r = fcntl.ioctl(fd, net.TUNGETIFF, bytes(40))
    name, flags = struct.unpack("16sH22x", r)
    return name.rstrip(b"\0").decode(), flags


def set_queue(fd, enabled):
    fcntl.ioctl(fd, net.TUNSETQUEUE, struct.pack("16sH22x", b"", net.IFF_ATTACH_QUEUE if enabled else net.IFF_DETACH_QUEUE))


def drain(fds, timeout=0.3):
    """Reads every frame waiting on `fds` until none comes for `timeout` s; returns the count."""
    n = 0
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    while True:
        ready = p.poll(timeout * 1000)
        if not ready:
            return n
        for fd, ev in ready:
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                p.unregister(fd)  # a detached queue polls as an error: it delivers nothing
                continue
            if ev & select.POLLIN:
                try:
                    os.read(fd, 65536)
                    n += 1
                except BlockingIOError:
                    pass
