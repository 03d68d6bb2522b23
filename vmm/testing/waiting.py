"""Waiting for what another thread does, in tests: a device's I/O thread,
a rate limiter's timer, a guest.  CI runs the suite on a shared, possibly
slower or loaded machine, so a test never assumes another thread has
already run (a counter read right after the event it follows, a fixed
sleep): it waits for the condition with a generous deadline that costs
nothing when all is well.

    assert until(lambda: dev.stats["requests"] >= 37)
    barrier(loop)          # every event the loop had already seen is handled

Deadlines are tens of seconds on purpose: a failing test is slow to fail,
a passing one is as fast as the machine allows.
"""
import threading
import time

# seconds: what a thread of ours gets to do something simple on a loaded machine
SLOW = 30.0


def until(pred, timeout=SLOW, poll=0.002):
    """pred()'s first truthy value, or its last (falsy) one once `timeout`
    seconds have passed."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(poll)


def barrier(loop, timeout=SLOW):
    """Return once `loop` (a vmm.virtio.ioloop.IoLoop) has finished every
    event it had already taken when this was called: a call queued now
    defers itself to just before the thread next sleeps, i.e. after the
    other handlers of its epoll batch and their deferred interrupts.  (The
    C fast path hands the loop's wake-up fd back to Python only after the
    kicks it took from the same epoll_wait, counters included.)"""
    done = threading.Event()
    key = object()
    loop.call_soon(lambda: loop.defer(key, done.set) or done.set())
    if not done.wait(timeout):
        raise AssertionError(f"{loop.name}: I/O thread did not run a call in {timeout} s")


class HeldClock:
    """A monotonic clock for a token bucket (TokenBucket(clock=...)) that
    stands still until start(), then runs at real speed from where it
    stood: what a bucket lets through before start() does not depend on
    how long the test took to get there (its refill would otherwise hand
    out tokens to a test thread the host descheduled)."""

    def __init__(self):
        self._at = time.monotonic()
        self._offset = None

    def __call__(self):
        if self._offset is None:
            return self._at
        return time.monotonic() - self._offset

    def start(self):
        """Let time run; returns the real time it started at."""
        now = time.monotonic()
        self._offset = now - self._at
        return now
