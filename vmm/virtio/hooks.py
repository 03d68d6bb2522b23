"""Loading a user's Python hook for a disk or a NIC (`hook=SOURCE:NAME`).

SOURCE is a path to a .py file or an importable module; NAME is an object
in it (a class is instantiated with no arguments).  What a hook may define
(every method optional, see examples/hooks.py):

    blk_request(req) -> None | "ioerr" | "unsupp" | delay_seconds
        req.kind ("read", "write", "flush", ...), req.type, req.sector,
        req.nbytes, req.data (a copy of the payload for writes, else None)
    blk_done(req, status)             after completion (0 ok, 1 ioerr, 2 unsupp)
    net_frame(direction, frame) -> None | "drop" | bytes
        direction "rx" (to the guest) or "tx" (from it); frame is the
        Ethernet frame (bytes); return bytes to replace it

A hook runs on the device's I/O thread, per request: keep it short.  It is
only called when installed (the C fast path is used otherwise).
"""
import importlib
import importlib.util
import os


class HookError(ValueError):
    """A hook that cannot be loaded (one line)."""


def load_hook(text, what="hook"):
    source, sep, name = text.rpartition(":")
    if not sep or not source or not name:
        raise HookError(f"{what}: expected SOURCE:NAME (a .py file or module, and an object)")
    try:
        if source.endswith(".py") or os.sep in source:
            if not os.path.isfile(source):
                raise HookError(f"{what}: {source}: no such file")
            spec = importlib.util.spec_from_file_location(f"pyvmm_hook_{abs(hash(source))}",
                                                          source)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(source)
    except HookError:
        raise
    except Exception as e:
        raise HookError(f"{what}: cannot load {source}: {type(e).__name__}: {e}") from None
    obj = getattr(mod, name, None)
    if obj is None:
        raise HookError(f"{what}: {source} has no {name!r}")
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise HookError(f"{what}: {name}() failed: {type(e).__name__}: {e}") from None
    if not any(hasattr(obj, m) for m in ("blk_request", "blk_done", "net_frame")):
        raise HookError(f"{what}: {name} defines none of blk_request, blk_done, net_frame")
    return obj
