"""seccomp-bpf confinement of the VMM's threads (issue #14), as Firecracker
does: once the VM is built, every thread installs a filter allowing only
the system calls its kind needs; anything else ends the VMM with SIGSYS
after one line on stderr naming the thread kind and the call
(native/src/seccomp.c, built with libseccomp).

    seccomp.apply("vcpu")       # on the thread to confine; raises SeccompError

Thread kinds and who applies them:
    main     Machine.run(), after every other thread is started (a filter
             is inherited by threads created later, so the main thread goes last)
    vcpu     VcpuThread.run(), before its first KVM_RUN
    io       each device's IoLoop thread, at Machine.run() before the vCPUs start
    console  the console input thread, when it starts
    api      the API server thread (vmm/api), when it starts

The allow-lists are one table, ALLOW below: a feature that needs a new call
(io_uring, vsock sockets, snapshot files...) adds it to the kinds that make
it, with a comment saying why.  An entry "name(aN==VALUE)" allows the call
only when argument N equals VALUE (a number or a `socket` module constant,
e.g. "socket(a0==AF_UNIX)").  To find what a thread calls:
`strace -f -o trace pyvmm run --no-seccomp ...`.
"""
import threading

# Every thread: memory management by Python and glibc malloc, locks and
# condition variables (futex), sleeping and time, signal delivery and
# return (the vCPU kick, SIGSYS's own ending), logging to stderr, exiting.
COMMON = (
    "brk", "mmap", "munmap", "mremap", "madvise", "mprotect",
    "futex", "sched_yield", "getpid", "gettid", "tgkill",
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
    "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack",
    "write", "exit", "exit_group", "getrandom",
)

ALLOW = {
    # Waits for the vCPUs and the stop event, handles SIGINT/SIGTERM/SIGHUP,
    # kicks vCPUs; then tears down: stops the I/O threads (eventfd write,
    # epoll_ctl), flushes and closes the disk images, closes the KVM fds and
    # unmaps guest memory, restores the terminal (ioctl TCSETS*), removes
    # the API socket (unlink), exits.
    "main": COMMON + (
        "read", "close", "ioctl", "fdatasync", "fsync", "epoll_ctl", "flock",
        "fstat", "newfstatat", "lseek", "fcntl", "unlink",
        "io_uring_enter",   # io_engine=io_uring: closing a disk waits for its requests
    ),
    # KVM_RUN and the register/state ioctls of a vCPU fd; port and MMIO
    # exits: the serial console's output (write), interrupts through KVM
    # irqfds (eventfd write) and KVM_IRQ_LINE (ioctl on the VM fd), virtio
    # queue notifications without an ioeventfd (the devices' I/O below).
    "vcpu": COMMON + (
        "ioctl", "read", "readv", "writev", "preadv", "pwritev", "pread64", "pwrite64",
        "fdatasync", "fallocate", "epoll_ctl",
        # virtio-vsock transmit queue without an ioeventfd: payloads to the host
        # socket, guest-initiated connects, half-closes, the OK line, closes
        "sendmsg", "sendto", "socket(a0==AF_UNIX)", "connect", "shutdown", "close", "timerfd_settime",

        "io_uring_enter",   # io_engine=io_uring: a notification without ioeventfd submits

        "fdatasync", "fallocate", "epoll_ctl", "timerfd_create", "timerfd_settime",
    ),
    # One per device: epoll over its eventfds (and a tap); virtio-blk reads,
    # writes, FLUSH and DISCARD/WRITE_ZEROES on the image; virtio-net frames
    # to and from the tap; interrupts through irqfds (eventfd write) or
    # KVM_IRQ_LINE (legacy virtio-pci INTx: ioctl).
    "io": COMMON + (
        "epoll_wait", "epoll_pwait", "epoll_ctl", "read", "readv", "writev",
        "preadv", "pwritev", "pread64", "pwrite64", "fdatasync", "fallocate", "ioctl",
        # virtio-vsock's host side (vmm/virtio/vsock_mux.py, native/src/vsock.c):
        # accepting on uds_path and reading the CONNECT line (recvfrom), the
        # OK line (sendto), payloads (sendmsg/readv), guest-initiated
        # connections to uds_path_PORT (socket: Unix only, connect), half-closes
        # (shutdown), closing connections, the connect-timeout timerfd;
        # Python's accept() checks the new fd (getsockname, getsockopt)
        "accept4", "recvfrom", "sendto", "sendmsg", "socket(a0==AF_UNIX)", "connect", "shutdown",
        "close", "timerfd_settime", "getsockname", "getsockopt",

        "io_uring_enter",   # io_engine=io_uring: submit on a kick, reap on the ring's eventfd

        # rate limiters and injected delays (vmm/virtio/timer.py): a timerfd per device
        "timerfd_create", "timerfd_settime",
        # adaptive polling (native/src/fastpath.c): is the thread being preempted?
        "getrusage",
    ),
    # Reads stdin (select with a timeout) and feeds the UART: its interrupt
    # is KVM_IRQ_LINE on the VM fd.
    "console": COMMON + ("select", "pselect6", "poll", "read", "ioctl"),
    # The API server thread (vmm/api/server.py) of `pyvmm run --api-sock`:
    # serves HTTP over its Unix socket; pause/resume (vCPU kicks, I/O thread
    # wake-ups) and inspection; PATCH /drives swaps a disk image (open, lock,
    # size, flush and close the old one).  (`pyvmm api` builds the VM on the
    # main thread; its API thread starts unconfined, see README, Security.)
    "api": COMMON + (
        "accept4", "accept", "recvfrom", "recvmsg", "sendto", "sendmsg", "read", "close",
        "shutdown", "getsockopt", "setsockopt", "getsockname", "poll", "ppoll", "select",
        "pselect6", "epoll_wait", "epoll_pwait", "epoll_ctl", "fstat", "newfstatat",
        "fcntl", "ioctl", "lseek", "openat", "flock", "fdatasync", "fsync", "statx",
        "unlink",
        # PUT /snapshot/create (vmm/snapshot.py): the state and memory files are
        # written beside their destination (sized with ftruncate, pages with
        # pwrite64) and renamed into place.
        "ftruncate", "pwrite64", "rename", "renameat", "renameat2",

        "io_uring_enter",   # io_engine=io_uring: requests in flight finish before a swap

        # PATCH of rate limiters/faults re-runs a paused queue through the device's timer
        "timerfd_create", "timerfd_settime",
        # ...and a PATCH that changes a device's faults or link state runs its
        # queues once on this thread: frames to and from the tap (readv/writev),
        # disk requests (preadv/pwritev/fallocate; pread64/pwrite64 for one
        # buffer: native/src/blk.c rw_all); found by the faults guest test
        "readv", "writev", "preadv", "pwritev", "fallocate", "pread64",
    ),
}

KINDS = tuple(ALLOW)

# Modules a thread of that kind may first need after it is confined, imported
# just before its filter goes in: a first import opens (and may list) files,
# which the filter refuses.  The API thread snapshots a paused VM (vmm.snapshot
# also asks uname(2) for the architecture at import) and a PATCH of a drive's
# or NIC's rate_limiter/faults builds the slow path (intercept*, faults with
# random, timer, trace).  Found by an audit of imports inside functions.
PRELOAD = {
    "api": ("vmm.snapshot", "vmm.virtio.intercept", "vmm.virtio.intercept_net",
            "vmm.virtio.faults", "vmm.virtio.ratelimit", "vmm.virtio.timer", "vmm.virtio.trace",
            "random"),
}


# Constants of the allow-list, as the Linux ABI fixes them on every
# architecture (include/linux/socket.h), so that building the vCPU's filter
# need not load the _socket extension (~0.5 ms of start-up); any other name
# comes from _socket.
LINUX_CONSTANTS = {"AF_UNIX": 1}


def _word(text):
    return bool(text) and all(c.isalnum() or c == "_" for c in text)


def parse_entry(entry):
    """'name' -> (name, -1, 0); 'name(aN==V)' -> (name, N, value)."""
    # Read by hand, not with re: re (with enum) is ~3 ms of `pyvmm run`'s
    # start-up that nothing else on its path needs any more.
    name, paren, cond = entry.partition("(")
    if not paren:
        if not _word(name):
            raise SeccompError(f"seccomp: bad allow-list entry {entry!r}")
        return name, -1, 0
    idx, value = cond[1:2], cond[4:-1]
    if (not _word(name) or cond[:1] != "a" or idx not in "012345" or not idx
            or cond[2:4] != "==" or cond[-1:] != ")" or not _word(value)):
        raise SeccompError(f"seccomp: bad allow-list entry {entry!r}")
    if value in LINUX_CONSTANTS:
        return name, int(idx), LINUX_CONSTANTS[value]
    # the C module: socket's constants without socket.py's enum set-up, which
    # cost milliseconds on each vCPU thread's way to its first KVM_RUN
    import _socket as socket
    v = int(value, 0) if value[0].isdigit() else getattr(socket, value, None)
    if v is None:
        raise SeccompError(f"seccomp: unknown constant {value!r} in {entry!r}")
    return name, int(idx), int(v)

# Test-only: PYVMM_SECCOMP_SELFTEST=<kind> in the environment makes a thread
# of that kind call sync(2), allowed nowhere, right after its filter is in
# (tests/integration/test_seccomp.py).  The environment is the host user's,
# never the guest's.
SELFTEST_ENV = "PYVMM_SECCOMP_SELFTEST"


class SeccompError(Exception):
    """The filter could not be installed (one line)."""


_enabled = False


def enable():
    """Turn confinement on for this process (pyvmm run without --no-seccomp;
    Machine.run with MachineConfig.seccomp).  Until then apply() does
    nothing, so a library user or a test process is never confined by a
    thread that calls apply() unconditionally (the API server)."""
    global _enabled
    _enabled = True


def enabled():
    return _enabled


def preload(kind):
    """Import PRELOAD[kind] now (apply() does it too; calling it earlier, while
    nothing waits, keeps those imports off the path to the guest's start)."""
    for name in PRELOAD.get(kind, ()):
        __import__(name)    # not importlib: one module fewer to load at every start


def _tracebacks_without_source():
    """A traceback reads each frame's source line through linecache (stat and
    open of the .py file), which no confined thread may do: the error being
    shown, with --debug or by logging's exc_info, would end the VMM with SIGSYS
    instead.  From the first filter on, tracebacks give file, line number and
    function only."""
    import sys
    linecache = sys.modules.get("linecache")
    if linecache is None:
        # Not loaded: nothing here formats tracebacks in Python (traceback
        # loads it), and once every thread is confined nothing can load it.
        # Each apply() looks again, the main thread's last.
        return
    linecache.checkcache = lambda filename=None: None
    linecache.updatecache = lambda filename, module_globals=None: []
    linecache.getline = lambda filename, lineno, module_globals=None: ""


_compiled = {}          # kind -> (BPF program cdata, its size), made by build()


def _rules(kind):
    from vmm.native import ffi
    entries = sorted(set(ALLOW[kind]))
    rules = [parse_entry(e) for e in entries]
    cnames = [ffi.new("char[]", n.encode()) for n, _, _ in rules]
    return (entries, cnames, ffi.new("const char *[]", cnames),
            ffi.new("int[]", [i for _, i, _ in rules]),
            ffi.new("uint64_t[]", [v for _, _, v in rules]), len(rules))


def _check(r, kind, entries, bad, what):
    import os
    from vmm.native import lib
    if r == -lib.PV_SECCOMP_E_NAME:
        raise SeccompError(f"seccomp: {entries[bad[0]]!r} is not a system call on this machine")
    if r < 0:
        raise SeccompError(f"seccomp: cannot {what} the {kind} filter: {os.strerror(-r)} "
                           "(--no-seccomp runs without)")


def build(kind):
    """Build the filter of `kind` now (libseccomp, a few ms) and keep its BPF
    program, so that apply(kind) later costs one system call: done while the
    API client configures the VM, it keeps the builds off the path from
    InstanceStart to the guest's first instruction."""
    from vmm.native import ffi, lib
    if kind not in ALLOW:
        raise SeccompError(f"seccomp: unknown thread kind {kind!r}")
    if kind not in _compiled:
        entries, _keep, arr, idx, val, n = _rules(kind)
        bad = ffi.new("int *")
        out = ffi.new("char[]", 65536)
        r = lib.pv_seccomp_compile(arr, idx, val, n, bad, out, len(out))
        _check(r, kind, entries, bad, "build")
        _compiled[kind] = (out, r)       # the cdata stays alive with the entry
    return _compiled[kind]


def build_quietly(kinds):
    """build() each kind now, leaving any error for apply() to raise on the
    thread it concerns (Machine builds them while the PIT's ioctl waits)."""
    for kind in kinds:
        try:
            build(kind)
        except SeccompError:
            pass


def prepare(kinds=None):
    """preload() and build() each kind (all by default)."""
    for kind in (ALLOW if kinds is None else kinds):
        preload(kind)
        build(kind)


def apply(kind):
    """Confine the calling thread to ALLOW[kind] if enable() was called;
    cannot be undone."""
    import os
    from vmm.native import lib
    if kind not in ALLOW:
        raise SeccompError(f"seccomp: unknown thread kind {kind!r}")
    if not _enabled:
        return
    preload(kind)
    _tracebacks_without_source()
    prog, size = build(kind)
    r = lib.pv_seccomp_install(kind.encode(), prog, size)
    _check(r, kind, (), None, "install")
    if os.environ.get(SELFTEST_ENV) == kind:
        os.sync()


def active():
    """Whether any thread of this process is confined."""
    from vmm.native import lib
    return bool(lib.pv_seccomp_active())


def apply_in(loop, kind="io", timeout=5.0):
    """Have an IoLoop's thread confine itself; waits until it has."""
    done, err = threading.Event(), []

    def call():
        try:
            apply(kind)
        except Exception as e:
            err.append(e)
        finally:
            done.set()
    loop.call_soon(call)
    if not done.wait(timeout):
        raise SeccompError(f"seccomp: {loop.name} did not install its filter in {timeout:g} s")
    if err:
        raise err[0]
