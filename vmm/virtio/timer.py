"""One-shot callbacks on a device's I/O loop, through a timerfd.

    t = Timers(ioloop)           # the timerfd joins the loop
    t.call_later(0.005, fn)      # fn() runs on the loop thread in 5 ms
    t.close()

Used by the rate limiters (resume a paused queue when the bucket has
refilled) and by injected delays (complete a request later).  No thread,
no polling: the loop sleeps in epoll until the earliest deadline.  Without
an I/O loop, the owner calls `run_due()` (tests).
"""
import ctypes
import heapq
import itertools
import os
import threading
import time

CLOCK_MONOTONIC = 1
TFD_NONBLOCK, TFD_CLOEXEC = 0o4000, 0o2000000

# dlopen(NULL): libc is already mapped in every Python process; find_library("c")
# would run /sbin/ldconfig -p in a child process at import (milliseconds of start-up).
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.c_void_p]


def timerfd_create():
    fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def timerfd_arm(fd, delay):
    """Fire once after `delay` seconds (0 disarms, so at least 1 ns)."""
    spec = _Itimerspec()
    if delay is not None:
        ns = max(1, int(delay * 1e9))
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
    if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Timers:
    def __init__(self, ioloop=None):
        self.fd = timerfd_create()
        self._heap = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._ioloop = ioloop
        if ioloop is not None:
            ioloop.add(self.fd, self.run_due)

    def call_later(self, delay, fn, *args):
        deadline = time.monotonic() + max(0.0, delay)
        seq = next(self._seq)
        with self._lock:
            heapq.heappush(self._heap, (deadline, seq, fn, args))
            if self._heap[0][1] == seq:      # the new earliest deadline
                self._arm()

    def __len__(self):
        return len(self._heap)

    def next_deadline(self):
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def _arm(self):
        if self.fd < 0:
            return
        if self._heap:
            timerfd_arm(self.fd, self._heap[0][0] - time.monotonic())
        else:
            timerfd_arm(self.fd, None)

    def run_due(self):
        """Run every callback whose time has come, then re-arm."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, OSError):
            pass
        now = time.monotonic()
        due = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap))
            self._arm()
        for _, _, fn, args in due:
            fn(*args)
        return len(due)

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            if self._ioloop is not None:
                self._ioloop.remove(fd)
            os.close(fd)
        self._heap.clear()
