"""HTTP/1.1 by hand, for the live tests that must write or read the bytes themselves
(framing a client library would fix, half-sent requests, upgrades, many connections, a
stream read as it comes): a connection, an answer's head split off and parsed, its body
read by Content-Length or chunk by chunk. mqtapd_client.Client is for everything else."""
import socket
import time


def connect(where, timeout=None, rcvbuf=None):
    """A connected socket: to the Unix socket at path `where`, or to 127.0.0.1 port `where`
    (an int). `timeout` (seconds) holds for the connect and every call after it; `rcvbuf`
    sets SO_RCVBUF before connecting."""
    s = socket.socket(socket.AF_INET if isinstance(where, int) else socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if timeout is not None:
            s.settimeout(timeout)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", where) if isinstance(where, int) else where)
    except BaseException:
        s.close()
        raise
    return s


def recv(s, after=b""):
    """What `s` has next; EOFError once the peer has closed (`after`: what came before, told
    in the error)."""
    data = s.recv(65536)
    if not data:
        raise EOFError(f"the connection ended after {after!r:.300}")
    return data


def read_head(s, buf=b""):
    """Reads from `s` (after `buf`, what came already) to the end of an answer's head;
    returns (head, what came after it). EOFError if the connection ends first."""
    while b"\r\n\r\n" not in buf:
        buf += recv(s, buf)
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head):
    """(status, headers) of an answer's head (bytes, without the blank line): the status an
    int (None for an empty head), the headers' names lower case, their values stripped."""
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else None
    return status, {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}


def split(raw):
    """(status, headers, body) of a whole answer as read (the body as it came: not de-chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return (*parse_head(head), body)


def read_body(s, headers, body=b""):
    """Reads from `s` until `body` (what came after the head) is as long as the answer's
    Content-Length says (none: as it is); returns it. EOFError if the connection ends first."""
    while len(body) < int(headers.get("content-length", 0)):
        body += recv(s, body)
    return body


def chunks(s, buf=b""):
    """Yields the data of each chunk of a chunked body read from `s` (`buf`: what came after
    the head already), as each arrives; returns at the last chunk (size 0). EOFError if the
    connection ends first."""
    while True:
        while b"\r\n" not in buf:
            buf += recv(s, buf)
        size_line, buf = buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return
        while len(buf) < size + 2:
            buf += recv(s, buf)
        yield buf[:size]
        buf = buf[size + 2:]


def complete(out):
    """Whether `out` holds a whole answer (its body by Content-Length or to the last chunk)."""
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep:
        return False
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(b":") for l in head.split(b"\r\n")[1:])}
    if b"content-length" in headers:
        return len(body) >= int(headers[b"content-length"])
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return body.endswith(b"0\r\n\r\n")
    return False


def exchange(path, data, wait=30.0):
    """Sends `data` on a fresh connection to the Unix socket `path`; returns (status, headers,
    body) of the answer and whether the server closed the connection after it. Waits up to
    `wait` for the answer, and for the close when the answer says `Connection: close`;
    otherwise a moment."""
    s = connect(path)
    deadline = time.monotonic() + wait
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before all of it was sent: the answer is still there to read
    out = b""
    closed = False
    try:
        while True:
            left = deadline - time.monotonic()
            if complete(out) and b"\r\nconnection: close\r\n" not in out.partition(b"\r\n\r\n")[0].lower() + b"\r\n":
                left = min(left, 0.5)
            if left <= 0:
                break
            s.settimeout(left)
            b = s.recv(65536)
            if not b:
                closed = True
                break
            out += b
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    finally:
        s.close()
    return (*split(out), closed)
