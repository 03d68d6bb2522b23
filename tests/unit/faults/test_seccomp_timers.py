"""A rate-limited queue resumed by its timer on an I/O thread confined by
the "io" seccomp filter (vmm/seccomp.py): the timerfd calls are allowed.
Run in a child process: a missing system call kills the process (SIGSYS)."""
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, sys, tempfile, time
    from vmm import seccomp
    from vmm.memory import GuestMemory, MiB
    from vmm.testing.mockdriver import BlkDriver, T_IN
    from vmm.testing.streams import BlkStream
    from vmm.virtio.blk import BlkDevice
    from vmm.virtio.ioloop import IoLoop
    from vmm.virtio.mmio import VirtioMmio
    from vmm.virtio.ratelimit import RateLimiter, TokenBucket
    img = tempfile.NamedTemporaryFile(delete=False)
    img.write(bytes(1 << 20)); img.close()
    loop = IoLoop("io-test"); loop.start()
    seccomp.enable()
    seccomp.apply_in(loop, "io")
    mem = GuestMemory(32 * MiB)
    dev = BlkDevice(img.name)
    dev.ioloop = loop
    # 400 ops/s; the bucket holds 200 ms, so a stall of either thread on a
    # loaded host loses little of the ~320 requests expected (> 100 asserted)
    dev.configure(limiter=RateLimiter(ops=TokenBucket(80, 200)))
    t = VirtioMmio(dev, mem)
    d = BlkDriver(t, mem, arena_size=24 << 20)
    assert d.init()
    n, _, secs = BlkStream(d, T_IN, 4096, depth=32).run(0.6)
    os.unlink(img.name)
    print("done", n, dev.intercept.limiter.throttled > 0, seccomp.active())
""")


def test_limiter_timer_under_io_seccomp_filter():
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    words = p.stdout.split()
    assert words[0] == "done" and int(words[1]) > 100 and words[2:] == ["True", "True"], p.stdout
