"""A small client for the control API (standard library http.client over a
Unix socket), used by the tests, the benchmarks and scripts:

    from vmm.api.client import ApiClient
    with ApiClient("/tmp/vm.sock") as api:
        api.put("/boot-source", {"kernel_image_path": "vmlinux"})
        api.action("InstanceStart")
        print(api.get("/")["state"])

Errors (HTTP 400/500) raise ApiRequestError carrying the fault_message.
One connection is kept alive across requests and reopened if the server
closed it.
"""
import http.client
import json
import socket
import time


class ApiRequestError(Exception):
    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class ApiClient:
    def __init__(self, path, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self._conn = None

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method, url, body=None):
        """(status, parsed JSON or None); does not raise on HTTP errors."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.path, self.timeout)
            try:
                self._conn.request(method, url, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()           # the server closed a kept-alive connection: retry once
                if attempt:
                    raise
        if resp.will_close:
            self.close()
        return resp.status, (json.loads(raw) if raw else None)

    def _checked(self, method, url, body=None):
        status, obj = self.request(method, url, body)
        if status >= 300:
            msg = obj.get("fault_message", obj) if isinstance(obj, dict) else obj
            raise ApiRequestError(status, msg)
        return obj

    def get(self, url):
        return self._checked("GET", url)

    def put(self, url, body):
        return self._checked("PUT", url, body)

    def patch(self, url, body):
        return self._checked("PATCH", url, body)

    def action(self, action_type):
        return self.put("/actions", {"action_type": action_type})

    def wait_state(self, state, timeout=60.0):
        """Poll GET / until the instance reports `state`."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get("/")["state"]
            if got == state or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def wait_for_socket(path, timeout=10.0, proc=None):
    """Wait until something accepts connections on `path` (True) or the
    process `proc` ends / the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return True
        except OSError:
            time.sleep(0.002)
        finally:
            s.close()
    return False
