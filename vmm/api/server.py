"""HTTP/1.1 over a Unix socket, on its own thread, standard library only.

    server = ApiServer(path, handler)       # handler(method, path, body) -> (status, obj)
    server.start()                          # socket created 0600, thread started
    ...
    server.close()                          # thread stopped, socket removed

One selector loop serves every connection (keep-alive, pipelining, many
idle clients cost a buffer each, not a thread).  Requests are parsed by hand
with hard limits: the request head (line + headers) is at most MAX_HEAD
bytes and a body at most MAX_BODY bytes (Firecracker's own default payload
limit); a chunked body is refused.  Anything malformed gets a 400 with
{"fault_message": ...} and the connection is closed; the loop never dies
on a client's input.  `Expect: 100-continue` (curl sends it for bodies over
1 KiB) is answered.
"""
import json
import logging
import os
import selectors
import socket
import threading
import time

from vmm.api.listen import ApiSocketError, close_unix, listen_unix  # noqa: F401 (re-exported)

log = logging.getLogger("pyvmm.api")

MAX_HEAD = 8 * 1024
MAX_BODY = 51200
MAX_CONNECTIONS = 1024     # the listen backlog (vmm/api/listen.py)
RECV_SIZE = 64 * 1024
MAX_PENDING_OUT = 1 << 20  # a client that pipelines without reading is dropped
TICK = 1.0                 # seconds between handler ticks (periodic metrics)

REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
           500: "Internal Server Error"}


class HttpError(Exception):
    """Malformed HTTP: answered with a 400 and the connection closed."""


def response(status, obj=None, close=False):
    head = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", "Server: pyvmm"]
    body = b""
    if obj is not None:
        body = json.dumps(obj).encode()
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    elif status != 204:
        head.append("Content-Length: 0")
    head.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Request:
    __slots__ = ("method", "target", "version", "headers", "length", "close", "expect")


def parse_head(raw):
    """Request line and headers (bytes, without the blank line) -> Request."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError("the request line and headers must be ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(f"malformed request line {lines[0][:80]!r}")
    r = Request()
    r.method, r.target, r.version = parts
    if r.version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(f"unsupported protocol {r.version[:20]!r} (HTTP/1.1 expected)")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    r.headers = headers
    if "transfer-encoding" in headers:
        raise HttpError("chunked/encoded request bodies are not supported (send Content-Length)")
    cl = headers.get("content-length", "0")
    if not cl.isdigit() or len(cl) > 12:
        raise HttpError(f"invalid Content-Length {cl[:20]!r}")
    r.length = int(cl)
    if r.length > MAX_BODY:
        raise HttpError(f"request body too large ({r.length} bytes, at most {MAX_BODY})")
    conn = headers.get("connection", "").lower()
    r.close = conn == "close" or (r.version == "HTTP/1.0" and conn != "keep-alive")
    r.expect = headers.get("expect", "").lower() == "100-continue"
    return r


class Connection:
    def __init__(self, sock):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.request = None          # parsed head waiting for its body
        self.closing = False         # close once outbuf is sent
        self.writing = False         # registered for EVENT_WRITE


class ApiServer:
    def __init__(self, path, handler, tick=None, sock=None):
        """`sock`: the descriptor listen_unix() made at `path` (the server
        owns it from here on); None to create it in bind() or start()."""
        self.path = os.fspath(path)
        self.handler = handler
        self.tick = tick
        self.requests = 0
        self._sock = None if sock is None else socket.socket(fileno=sock)
        self._sel = None
        self._thread = None
        self._stop = False
        self._conns = {}
        self._wake_r = self._wake_w = None
        self._confine = None            # (kind, Event): apply a seccomp filter on the thread

    # -- lifecycle ------------------------------------------------------------------
    def bind(self):
        """Create the listening socket (0600); an existing path is an error."""
        self._sock = socket.socket(fileno=listen_unix(self.path, MAX_CONNECTIONS))

    def start(self):
        if self._sock is None:
            self.bind()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._sock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="pyvmm-api", daemon=True)
        self._thread.start()

    def confine(self, kind="api", timeout=5.0):
        """Have the server thread install the seccomp filter `kind` (a filter
        can only be installed by the thread itself); waits until it has."""
        if self._thread is None:
            return
        done = threading.Event()
        self._confine = (kind, done)
        os.write(self._wake_w, b"c")
        done.wait(timeout)

    def close(self):
        if self._thread is not None:
            self._stop = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join(5)
            self._thread = None
        for c in list(self._conns.values()):
            c.sock.close()
        self._conns.clear()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._sock is not None:
            close_unix(self._sock.detach(), self.path)
            self._sock = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- loop -------------------------------------------------------------------------
    def _run(self):
        try:
            from vmm import seccomp       # issue #14; absent until that lands
        except ImportError:
            seccomp = None
        if seccomp is not None:
            seccomp.apply("api")
        next_tick = time.monotonic() + TICK
        while not self._stop:
            if self._confine is not None:
                (kind, done), self._confine = self._confine, None
                try:
                    if seccomp is not None:
                        seccomp.apply(kind)
                finally:
                    done.set()
            try:
                events = self._sel.select(max(0.0, next_tick - time.monotonic()))
            except InterruptedError:
                continue
            for key, mask in events:
                try:
                    self._event(key, mask)
                except Exception:          # never let one client end the API
                    log.exception("API connection error")
                    if isinstance(key.data, Connection):
                        self._drop(key.data)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK
                if self.tick is not None:
                    try:
                        self.tick()
                    except Exception:
                        log.exception("API tick failed")

    def _event(self, key, mask):
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            try:
                os.read(self._wake_r, 64)
            except BlockingIOError:
                pass
        else:
            conn = key.data
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                self._write(conn)

    def _accept(self):
        while True:
            try:
                s, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:           # EMFILE etc.: try again on the next event
                log.warning("API accept: %s", e)
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                s.close()
                continue
            s.setblocking(False)
            c = Connection(s)
            self._conns[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, c)

    def _drop(self, conn):
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            self._conns.pop(fd, None)
            conn.sock.close()

    def _read(self, conn):
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)               # a truncated request is simply dropped
            return
        if conn.closing:
            return                         # already answered with an error; ignore the rest
        conn.inbuf += data
        self._process(conn)
        if len(conn.outbuf) > MAX_PENDING_OUT:
            self._drop(conn)
            return
        self._flush(conn)

    def _process(self, conn):
        while not conn.closing:
            if conn.request is None:
                end = conn.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    if len(conn.inbuf) > MAX_HEAD:
                        self._fail(conn, f"request head larger than {MAX_HEAD} bytes")
                    return
                if end > MAX_HEAD:
                    self._fail(conn, f"request head larger than {MAX_HEAD} bytes")
                    return
                try:
                    conn.request = parse_head(bytes(conn.inbuf[:end]))
                except HttpError as e:
                    self._fail(conn, str(e))
                    return
                del conn.inbuf[:end + 4]
                if conn.request.expect and len(conn.inbuf) < conn.request.length:
                    conn.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
            r = conn.request
            if len(conn.inbuf) < r.length:
                return
            body = bytes(conn.inbuf[:r.length])
            del conn.inbuf[:r.length]
            conn.request = None
            self.requests += 1
            status, obj = self.handler(r.method, r.target, body)
            conn.outbuf += response(status, obj, close=r.close)
            if r.close:
                conn.closing = True

    def _fail(self, conn, message):
        conn.outbuf += response(400, {"fault_message": message}, close=True)
        conn.closing = True
        conn.inbuf.clear()

    def _flush(self, conn):
        if conn.outbuf:
            self._write(conn)
        elif conn.closing:
            self._drop(conn)

    def _write(self, conn):
        try:
            n = conn.sock.send(conn.outbuf)
            del conn.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn)
            return
        if conn.outbuf:
            if not conn.writing:
                conn.writing = True
                self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif conn.closing:
            self._drop(conn)
        elif conn.writing:
            conn.writing = False
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
