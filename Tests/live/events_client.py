"""A watcher of GET /v1/events: reads the chunked ndjson stream on a thread, every line
checked against openapi.yaml's Event."""
import json
import socket
import threading
import time

from mqtapd_client import validate_event


class Watcher:
    def __init__(self, socket_path, query="", read=True, check=True):
        self.check = check
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not read:
            # A watcher that never reads: the smallest buffer, so it falls behind fast.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(socket_path)
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

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def _run(self):
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                buf += self._recv()
            head, buf = buf.split(b"\r\n\r\n", 1)
            with self.cond:
                self.status = int(head.split(b" ", 2)[1])
                self.cond.notify_all()
            if self.status != 200:
                return
            body = b""
            while True:
                while b"\r\n" not in buf:
                    buf += self._recv()
                size_line, buf = buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    with self.cond:
                        self.ended = True
                    return
                while len(buf) < size + 2:
                    buf += self._recv()
                body += buf[:size]
                buf = buf[size + 2:]
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
