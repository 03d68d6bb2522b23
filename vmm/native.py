"""The one wrapper over the cffi extension: `ffi`, `lib` and error handling.

C helpers return -errno; `check()` turns that into an OSError subclass that
names the operation (the ioctl), pygit2 style.
"""
import errno
import os

try:
    from vmm._native import ffi, lib
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "pyvmm's native module is not built; run `pip install -e .` (needs a C compiler "
        "and the Linux kernel headers)") from e


class NativeError(OSError):
    """A failed system call or ioctl; `.op` names it."""

    def __init__(self, op, err):
        super().__init__(err, f"{op}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        self.op = op


def check(ret, op):
    """Return `ret` unless it is a negative errno, which raises NativeError."""
    if ret < 0:
        raise NativeError(op, -ret)
    return ret


def ioctl(fd, name, arg=0):
    """ioctl(fd, KVM_<name>, arg): `arg` is a cdata pointer or an integer."""
    req = getattr(lib, name)
    if isinstance(arg, int):
        return check(lib.pv_ioctl_val(fd, req, arg), name)
    return check(lib.pv_ioctl(fd, req, arg), name)
