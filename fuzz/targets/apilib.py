"""What the API fuzz targets share: a Controller whose file-system reach is
confined to a scratch directory, and the checks on its answers.

The fuzzed client chooses paths (log_path, metrics_path, path_on_host,
kernel_image_path): the sandbox maps each to a file in the scratch directory
(an existing one or a missing one, chosen by the fuzzed string, so both
branches run) before the real handler sees it, so fuzzing never creates,
opens or locks host files.  InstanceStart goes through the real controller
code up to handing the start request to the main thread, which here answers
at once that there is no VM.  Logging configured by a request (PUT /logger)
is undone after each input.

A crash: an HTTP status other than 200/204/400, a 400 without a one-line
string fault_message, a non-JSON body, an exception out of the controller or
the server, or an error logged by the VMM (fuzzlib's trap).
"""
import json
import logging
import os
import tempfile

from fuzzlib import Broken, check, check_no_errors

from vmm.api import controller as ctl

_dir = None


def scratch():
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="pyvmm-fuzz-api-")
        with open(os.path.join(_dir, "disk.img"), "wb") as f:
            f.write(bytes(4096))
        with open(os.path.join(_dir, "vmlinux"), "wb") as f:
            f.write(b"\x7fELF")
        import atexit
        import shutil
        atexit.register(shutil.rmtree, _dir, True)
    return _dir


def _map(path, existing):
    """A fuzzed path -> a scratch file: `existing` when the fuzzed string
    ends like it (".img", "linux", ".log"...), else one that is missing."""
    if not isinstance(path, str):
        return path
    name = existing if path.endswith(existing[-3:]) else "missing/" + existing
    return os.path.join(scratch(), name)


class _Starts:
    """The main thread's end of InstanceStart: no VM to build here."""

    def put(self, req):
        req.finish(error="fuzzing: no VM is built")

    def get(self, timeout=None):
        raise AssertionError("unused")


class SandboxController(ctl.Controller):
    def __init__(self):
        super().__init__(instance_id="fuzz")
        self._starts = _Starts()

    def handle(self, method, path, body):
        root = logging.getLogger("pyvmm")
        level, handlers = root.level, list(root.handlers)
        try:
            return super().handle(method, path, body)
        finally:
            for h in root.handlers:
                if h not in handlers:
                    root.removeHandler(h)
                    h.close()
            root.setLevel(level)
            self._log_handler = None

    def put_logger(self, body):
        return super().put_logger(dict(body, log_path=_map(body.get("log_path"), "api.log"))
                                  if "log_path" in body else body)

    def put_metrics(self, body):
        return super().put_metrics(dict(body, metrics_path=_map(body["metrics_path"], "metrics.log")))

    def put_drive(self, body, drive_id):
        if "path_on_host" in body:
            body = dict(body, path_on_host=_map(body["path_on_host"], "disk.img"))
        return super().put_drive(body, drive_id)

    def put_boot_source(self, body):
        body = dict(body)
        for k in ("kernel_image_path", "initrd_path"):
            if k in body:
                body[k] = _map(body[k], "vmlinux")
        return super().put_boot_source(body)

    def close(self):
        self.metrics.close()
        for name in ("api.log", "metrics.log"):     # files a request created: gone
            try:
                os.unlink(os.path.join(scratch(), name))
            except FileNotFoundError:
                pass


def check_answer(status, obj):
    check(status in (200, 204, 400), f"status {status}: {obj}")
    if status == 400:
        check(isinstance(obj, dict) and isinstance(obj.get("fault_message"), str),
              f"400 without a fault_message: {obj!r}")
        msg = obj["fault_message"]
        check(msg and "Traceback" not in msg, f"fault_message {msg!r}")
    if obj is not None:
        json.dumps(obj)               # must serialize
    check_no_errors()


def parse_responses(stream):
    """Split what the server sent into (status, body object) pairs; raises
    Broken on anything that is not a well-formed response."""
    out = []
    while stream:
        end = stream.find(b"\r\n\r\n")
        check(end >= 0, f"truncated response head {stream[:80]!r}")
        head = stream[:end].decode("ascii").split("\r\n")
        stream = stream[end + 4:]
        parts = head[0].split(" ", 2)
        check(parts[0] == "HTTP/1.1" and parts[1].isdigit(), f"status line {head[0]!r}")
        status = int(parts[1])
        fields = dict(h.split(": ", 1) for h in head[1:])
        n = int(fields.get("Content-Length", "0"))
        body, stream = stream[:n], stream[n:]
        check(len(body) == n, "truncated response body")
        if status == 100:
            continue
        try:
            obj = json.loads(body) if n else None
        except ValueError:
            raise Broken(f"response body is not JSON: {body[:80]!r}") from None
        out.append((status, obj))
    return out
