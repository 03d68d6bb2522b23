"""Fuzz target: the API server's HTTP/1.1 parsing (vmm/api/server.py) in
front of the real request handling: the input is the byte stream a client
sends on one connection, cut into reads at fuzzed places; the server reads
it from a socketpair exactly as from an accepted client (ApiServer._read).
The server must never raise, and what it sends back must be a sequence of
well-formed responses, each 100/200/204/400 with a JSON body (apilib)."""
import selectors
import socket

from apilib import SandboxController, check_answer, parse_responses
from fuzzlib import check, check_no_errors

from vmm.api import server as srv


def one_input(data):
    if not data:
        return
    cuts = sorted({(b * 7) % max(len(data), 1) for b in data[:data[0] % 8]} | {len(data)})
    c = SandboxController()
    s = srv.ApiServer("/nonexistent/fuzz.sock", c.handle)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.setblocking(False)
    peer.setblocking(False)
    s._sel = selectors.DefaultSelector()
    conn = srv.Connection(mine)
    s._conns[mine.fileno()] = conn
    s._sel.register(mine, selectors.EVENT_READ, conn)
    out = bytearray()
    try:
        pos = 1
        for cut in cuts:
            if cut <= pos:
                continue
            peer.send(data[pos:cut])
            pos = cut
            s._read(conn)
            while True:                     # the client reads; the server sends the rest
                try:
                    got = peer.recv(1 << 20)
                except BlockingIOError:
                    got = b""
                out += got
                if not conn.outbuf or mine.fileno() < 0:
                    break
                s._write(conn)
            if mine.fileno() < 0:          # the server closed the connection
                break
        check_no_errors()
        answers = parse_responses(bytes(out))
        for status, obj in answers:
            check_answer(status, obj)
        check(len(answers) <= s.requests + 1, "more answers than requests")
    finally:
        s._sel.close()
        mine.close()
        peer.close()
        c.close()
