"""Who may call: a token on TCP (every request), none on the Unix socket, the socket's group."""
import grp
import os
import subprocess

import pytest

import net
import rawhttp
from conftest import BIN, Daemon, PREFIX
from mqtapd_client import Client


def test_tcp_needs_the_token_unix_does_not(daemon):
    for path in ("/v1/health", "/metrics", "/v1/devices", "/v1/limits"):
        for auth in (None, "Bearer nope", f"Bearer {daemon.token}x", f"Basic {daemon.token}"):
            h = {"Authorization": auth} if auth else {"Authorization": ""}
            r = daemon.tcp.request("GET", path, headers=h)
            assert r.status == 401 and r.code == "unauthorized", (path, auth, r)
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert daemon.tcp.get("/v1/health").status == 200
    assert Client(unix_path=daemon.socket).get("/v1/health").status == 200
    # The token never reaches the log.
    assert not any(daemon.token in line for line in daemon.log)


def test_without_the_token_nothing_but_401_is_told(daemon):
    # Not 413 for a body over the limit, nor 400 for its framing: the headers alone say 401,
    # before any body is read (none is sent here: the answer must come without it), and the
    # connection closes.
    for framing in (b"Content-Length: 100000\r\n", b"Content-Length: 2\r\nContent-Length: 3\r\n"):
        with rawhttp.connect(daemon.port, timeout=10) as s:
            s.sendall(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                      b"Content-Type: application/json\r\n" + framing + b"\r\n")
            head, _ = rawhttp.read_head(s)
        status, headers = rawhttp.parse_head(head)
        assert head.startswith(b"HTTP/1.1 ") and status == 401 and headers.get("connection", "").lower() == "close", head
    assert daemon.tcp.get("/v1/health").status == 200


# 640 is allowed (a scraper's group may read the token: test_metrics); others may never, nor
# may the group write it.
@pytest.mark.parametrize("mode,needle", [(None, "--token-file"), (0o644, "chmod 600 or 640"), (0o604, "chmod 600 or 640"),
                                         (0o660, "chmod 600 or 640")])
def test_tcp_without_a_private_token_file_does_not_start(tmpdir_short, mode, needle):
    args = [BIN, "--listen", f"unix:{tmpdir_short}/api.sock", "--listen", "tcp:127.0.0.1:0",
            "--state-dir", f"{tmpdir_short}/state"]
    if mode is not None:
        path = os.path.join(tmpdir_short, "token")
        with open(path, "w") as f:
            f.write("abc\n")
        os.chmod(path, mode)
        args += ["--token-file", path]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and needle in r.stderr, r.stderr


def test_requests_log_the_peers_credentials(daemon):
    assert daemon.unix.get("/v1/limits").status == 200
    want = (f"pid={os.getpid()}", f"uid={os.getuid()}", f"gid={os.getgid()}")
    # The log is read on a thread: the line comes a moment after the answer.
    assert net.settle(lambda: any("path=/v1/limits" in l and all(w in l for w in want) for l in daemon.log)), \
        [l for l in daemon.log if "path=/v1/limits" in l][-3:]


@pytest.fixture
def user_and_group():
    """A system user and a group made for the test, removed after."""
    tag = PREFIX.replace("mql", "")
    user, group = f"mqtu{tag}", f"mqtg{tag}"
    subprocess.run(["groupadd", "--system", group], check=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
    try:
        yield user, group
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def connect_as(user, path):
    """Whether `user` can call /v1/health over the socket (exit 0) or is refused (2)."""
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try: s.connect(sys.argv[1])\n"
            "except PermissionError: sys.exit(2)\n"
            "s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "sys.exit(0 if s.recv(100).startswith(b'HTTP/1.1 200') else 3)\n")
    return subprocess.run(["runuser", "-u", user, "--", "python3", "-c", code, path], capture_output=True,
                          text=True, timeout=30).returncode


def test_socket_group_decides_who_connects(tmpdir_short, user_and_group):
    user, group = user_and_group
    os.chmod(tmpdir_short, 0o755)
    d = Daemon(tmpdir_short, "--socket-group", group, tcp=False)
    try:
        st = os.stat(d.socket)
        assert st.st_uid == 0 and st.st_gid == grp.getgrnam(group).gr_gid and st.st_mode & 0o777 == 0o660
        os.chmod(os.path.dirname(d.socket), 0o755)
        assert connect_as(user, d.socket) == 2, "not in the group: refused"
        subprocess.run(["usermod", "-aG", group, user], check=True)
        assert connect_as(user, d.socket) == 0, "in the group: served"
    finally:
        assert d.stop() == 0
    r = subprocess.run([BIN, "--listen", f"unix:{tmpdir_short}/x.sock", "--state-dir", f"{tmpdir_short}/s2",
                        "--socket-group", "no-such-group-mqt"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--socket-group" in r.stderr
