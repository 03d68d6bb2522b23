"""An epoll thread that services eventfds (KVM ioeventfds for QueueNotify,
§4.2.3.3), so a queue kick never returns to Python on a vCPU thread.  A
Machine gives each device its own IoLoop (Cloud Hypervisor's model): a slow
fdatasync on one disk does not hold up another disk or a NIC.

    loop = IoLoop(); loop.start()
    loop.add(fd, callback)   # callback() runs on the loop thread when fd is readable
    ...
    loop.stop(timeout)       # False if a handler is still running after `timeout`
    loop.close()

`loop.add(fd, callback, fast=q)` also hands the fd's common case to C: while
any such fd is registered the thread waits in native/src/fastpath.c
(pv_fast_wait, GIL released), which serves enabled fast queues itself and
returns every other ready fd (including the loop's own wake-up, so pause,
stop and call_soon work as before) to the Python handlers below; see
vmm/virtio/fastpath.py.

`loop.defer(key, fn)` on the loop's thread runs fn() once per key just
before the thread next sleeps (elsewhere it returns False: the caller acts
now).  Transports raise their interrupts that way: the guest's handler
(a vCPU, or bench/driver.c's callback) needs the GIL, and signalling it
while this thread still has Python to run made the two contend for the GIL
on every request (bench/blk.py QD1, io_uring engine: ~13k -> ~23k req/s).

Handlers must drain their fd (drain_eventfd) and bound their work per call
(re-signal their eventfd to be called again): the loop checks for a stop
between calls.  An exception in a handler is logged (one line; the
traceback with --debug) and the loop keeps running.
"""
import collections
import errno
import logging
import os
import select
import threading

log = logging.getLogger("pyvmm.virtio.io")


def drain_eventfd(fd):
    """Read (reset) an EFD_NONBLOCK eventfd; returns its counter (0 if none)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def signal_eventfd(fd):
    os.write(fd, (1).to_bytes(8, "little"))


class IoLoop:
    def __init__(self, name="pyvmm-io"):
        self.name = name
        self._ep = select.epoll()
        self._handlers = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._thread = None
        self._stop = False
        self._calls = collections.deque()    # call_soon() functions for the thread
        self.errors = 0      # handler exceptions seen (logged)
        # pause(): the thread parks between handlers until resume(); fds stay
        # readable (epoll is level-triggered), so nothing is lost meanwhile.
        self._pause_req = False
        self._parked = threading.Event()
        self._resume = threading.Event()
        # fds whose common case runs in C (vmm/virtio/fastpath.py): a table
        # native/src/fastpath.c reads; its entries stay alive with the loop
        self._fast = None
        self._fast_keep = []
        self._ident = None                   # the thread's ident while it runs
        self._deferred = {}                  # key: fn, run before the thread sleeps
        self._on_park = []                   # fns run on the thread as it parks (pause)

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def add(self, fd, callback, fast=None):
        """`fast`: a `struct pv_fast_queue *` (vmm/virtio/fastpath.py) whose
        kicks C services while it is enabled; `callback` runs otherwise."""
        if fd in self._handlers:
            raise ValueError(f"fd {fd} is already in the I/O loop")
        if fast is not None:
            self._add_fast(fd, fast)
        self._handlers[fd] = callback
        self._ep.register(fd, select.EPOLLIN)

    def set_fast(self, fd, fast):
        """Map an fd already in the loop to fast queue `fast` as well (an
        io_uring completion eventfd: C serves the queue on either fd)."""
        if fd not in self._handlers:
            raise ValueError(f"fd {fd} is not in the I/O loop")
        self._add_fast(fd, fast)

    def _add_fast(self, fd, fast):
        from vmm.native import ffi, lib
        if self._fast is None:
            self._fast = ffi.new("struct pv_fast_loop *")
            self._fast.epfd = self._ep.fileno()
            self._fast_out = ffi.new("int32_t[32]")
        fl = self._fast
        slots = [i for i in range(fl.n) if fl.fds[i] < 0]
        if slots:
            i = slots[0]
        elif fl.n < lib.PV_FAST_MAX:
            i = fl.n
        else:
            return          # table full: this fd just takes the Python path
        if not any(k == fast for k in self._fast_keep):
            self._fast_keep.append(fast)    # C may still hold the pointer
        fl.q[i] = fast
        fl.fds[i] = fd
        if i == fl.n:
            fl.n = i + 1
        if self.running:
            signal_eventfd(self._wake)  # a thread asleep in Python's poll re-waits in C

    def remove(self, fd):
        if self._fast is not None:
            fl = self._fast
            for i in range(fl.n):
                if fl.fds[i] == fd:
                    fl.fds[i] = -1
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def on_park(self, fn, add=True):
        """Run fn() on the loop's thread each time it parks for pause(),
        before pause() returns (e.g. finish I/O still in flight, so a paused
        device is quiescent); add=False removes it."""
        if add:
            self._on_park.append(fn)
        elif fn in self._on_park:
            self._on_park.remove(fn)

    def defer(self, key, fn):
        """On the loop's thread: run fn() just before it next waits (once,
        however often `key` is deferred meanwhile) and return True; on any
        other thread: False (the caller runs it itself)."""
        if threading.get_ident() != self._ident:
            return False
        self._deferred.setdefault(key, fn)
        return True

    def _run_deferred(self):
        while self._deferred:
            key = next(iter(self._deferred))
            self._call(self._deferred.pop(key))

    def call_soon(self, fn):
        """Run fn() on the loop's thread (e.g. to install its seccomp filter)."""
        self._calls.append(fn)
        signal_eventfd(self._wake)

    def start(self):
        if self.running:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self):
        """Ask the thread to stop after the handler in progress (no wait)."""
        if self._thread is not None:
            self._stop = True
            self._resume.set()          # a paused loop wakes up to stop
            signal_eventfd(self._wake)

    def pause(self, timeout=5.0):
        """Park the thread once the handler in progress (if any) has returned;
        no handler runs until resume()."""
        if not self.running:
            return
        self._parked.clear()
        self._resume.clear()
        self._pause_req = True
        signal_eventfd(self._wake)
        if not self._parked.wait(timeout):
            raise RuntimeError(f"{self.name}: I/O thread did not pause in {timeout} s")

    def resume(self):
        self._pause_req = False
        self._resume.set()

    @property
    def paused(self):
        return self._pause_req and self._parked.is_set()

    def stop(self, timeout=5.0):
        """Stop the thread after the handler in progress (if any) returns.
        Returns False if it is still running after `timeout` seconds (a
        handler stuck in a system call): then the fds and whatever the
        handlers use must stay open."""
        if self._thread is None:
            return True
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._thread = None
        drain_eventfd(self._wake)
        return True

    def close(self):
        if not self.stop():
            log.error("%s: I/O thread did not stop; leaving its fds open", self.name)
            return
        if self._ep is not None:
            self._ep.close()
            os.close(self._wake)
            self._ep = None
            self._handlers.clear()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self):
        self._ident = threading.get_ident()
        try:
            self._loop()
        finally:
            self._run_deferred()
            self._ident = None

    def _loop(self):
        while not self._stop:
            self._run_deferred()        # interrupts raised by the handlers, last
            if self._pause_req:
                drain_eventfd(self._wake)
                self._run_calls()
                for fn in list(self._on_park):
                    self._call(fn)
                self._parked.set()
                self._resume.wait()
                self._parked.clear()
                continue
            try:
                events = self._wait()
            except InterruptedError:
                continue
            for fd, _ in events:
                if self._stop or self._pause_req:
                    break
                if fd == self._wake:
                    drain_eventfd(self._wake)
                    self._run_calls()
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                self._call(handler, fd)

    def _wait(self):
        fl = self._fast
        if fl is None or not fl.n:
            return self._ep.poll()
        from vmm.native import lib
        n = lib.pv_fast_wait(fl, self._fast_out, 32)     # GIL released meanwhile
        if n < 0:
            if n == -errno.EINTR:
                raise InterruptedError
            raise OSError(-n, os.strerror(-n))
        return [(self._fast_out[i], 0) for i in range(n)]

    @property
    def epoll_fd(self):
        """The loop's epoll (C fast paths add and remove fds in it)."""
        return self._ep.fileno()

    @property
    def fast_counts(self):
        """(epoll wake-ups, kicks handled in C) of the fast path."""
        fl = self._fast
        return (fl.wakeups, fl.handled) if fl is not None else (0, 0)

    def _run_calls(self):
        while self._calls:
            self._call(self._calls.popleft())

    def _call(self, handler, fd=None):
        try:
            handler()
        except Exception as e:
            self.errors += 1
            log.error("%s: handler for fd %s failed: %s", self.name, fd, e)
            log.debug("traceback", exc_info=True)   # with --debug
