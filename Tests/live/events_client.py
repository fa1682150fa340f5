"""A watcher of GET /v1/events: reads the chunked ndjson stream on a thread, every line
checked against openapi.yaml's Event."""
import json
import socket
import threading
import time

import rawhttp
from mqtapd_client import validate_event


class Watcher:
    def __init__(self, socket_path, query="", read=True, check=True):
        self.check = check
        # A watcher that never reads: the smallest buffer, so it falls behind fast.
        self.sock = rawhttp.connect(socket_path, rcvbuf=None if read else 4096)
        self.sock.sendall(f"GET /v1/events{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.events = []
        self.blank = 0
        self.ended = False      # the chunked body closed cleanly (terminating chunk)
        self.closed = False     # the connection closed (cleanly or not)
        self.status = None
        self.cond = threading.Condition()
        self.thread = None
        if read:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        try:
            head, buf = rawhttp.read_head(self.sock)
            with self.cond:
                self.status = rawhttp.parse_head(head)[0]
                self.cond.notify_all()
            if self.status != 200:
                return
            body = b""
            for data in rawhttp.chunks(self.sock, buf):
                body += data
                while b"\n" in body:
                    line, body = body.split(b"\n", 1)
                    with self.cond:
                        if line.strip():
                            e = json.loads(line)
                            if self.check:
                                validate_event(e)
                            self.events.append(e)
                        else:
                            self.blank += 1
                        self.cond.notify_all()
            with self.cond:
                self.ended = True
        except (EOFError, OSError):
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def wait(self, pred, timeout=30):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def types(self):
        with self.cond:
            return [e["type"] for e in self.events]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.thread:
            self.thread.join(5)
