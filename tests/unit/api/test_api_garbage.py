"""Hostile clients: truncated requests, oversized heads and bodies, invalid
UTF-8, binary noise, 500 connections at once.  The server answers each with
a 400 or drops it, and GET / still works afterwards."""
import os
import socket
import threading

import pytest

from vmm.api import server as srv


def raw(path, data, read=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = b""
    if read:
        try:
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    s.close()
    return out


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost",                                # truncated head
    b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vcpu",   # truncated body
    b"\x00\x01\x02\xff\r\n\r\n",                             # binary noise
    b"GET /\xff\xfe HTTP/1.1\r\n\r\n",                       # invalid UTF-8 in the path
    b"GET / HTTP/1.1\r\nX-\xc3\x28: 1\r\n\r\n",              # invalid UTF-8 in a header
    b"PUT /boot-source HTTP/1.1\r\nContent-Length: 4\r\n\r\n\xc3\x28\xa0\xa1",  # bad UTF-8 body
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * (srv.MAX_HEAD + 10) + b"\r\n\r\n",
    b"G" * (srv.MAX_HEAD * 4),                               # head without an end
    b"PUT /boot-source HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (srv.MAX_BODY + 1)
    + b"x" * (srv.MAX_BODY + 1),                             # body over the limit
    b"PUT /boot-source HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + os.urandom(1 << 20),
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_then_get(server, api, data):
    out = raw(server.path, data)
    if out:     # either a 400 with a fault_message, or the connection is just closed
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]
        assert b'"fault_message"' in out
    assert api.get("/")["state"] == "Not started"


def test_all_garbage_on_one_connection_each_at_once(server, api):
    threads = [threading.Thread(target=raw, args=(server.path, d)) for d in GARBAGE * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert api.get("/")["state"] == "Not started"


@pytest.fixture
def many_fds():
    """Client and server ends of 500 connections live in this one process."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048 if hard == resource.RLIM_INFINITY else min(hard, 2048)
    if want < 1100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 500 connections in-process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_500_concurrent_connections(server, api, many_fds):
    socks = []
    try:
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(server.path)
            socks.append(s)
        for i, s in enumerate(socks):     # half send a partial request and stay idle
            s.sendall(b"GET / HTTP/1.1\r\n" if i % 2 else b"GET / HTTP/1.1\r\n\r\n")
        answered = 0
        for i, s in enumerate(socks):
            if i % 2 == 0:
                data = b""
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    data += s.recv(4096)
                answered += data.startswith(b"HTTP/1.1 200 ")
        assert answered == 250
        assert api.get("/")["state"] == "Not started"     # while 500 are still open
    finally:
        for s in socks:
            s.close()
    assert api.get("/")["state"] == "Not started"


def test_client_that_never_reads(server, api):
    """Pipelined requests from a client that does not read its answers."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    s.setblocking(False)
    sent = 0
    try:
        while sent < 8 << 20:
            sent += s.send(b"GET /vm/config HTTP/1.1\r\n\r\n" * 1000)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    assert api.get("/")["state"] == "Not started"
    s.close()
