"""Token-bucket rate limiters with Firecracker's semantics.

A `RateLimiter` has two independent buckets, bandwidth (bytes) and ops
(requests); either may be absent.  A bucket is {size, one_time_burst,
refill_time (ms)}: it starts full, refills continuously at size/refill_time
and never above `size`; `one_time_burst` is an extra initial credit spent
first and never refilled.  A request costs 1 op and its byte count.  If a
bucket cannot pay, nothing is taken from either bucket and the caller is told
how long to wait (the queue pauses and a timer resumes it, see intercept.py).
A request larger than the whole bucket (`size`) is let through once the
bucket is full, draining it, and the debt is paid by a longer wait (as
Firecracker's OverConsumption), so a big request never blocks forever.

CLI form of a bucket: SIZE:REFILL_MS[:BURST], sizes with K/M/G suffixes
(1024-based), e.g. `bw=1M:100` (10 MiB/s) or `ops=100:100` (1000 ops/s).
API form: Firecracker's {"bandwidth": {"size": .., "one_time_burst": ..,
"refill_time": ..}, "ops": {...}}.
"""
import re
import threading
import time


class RateLimitError(ValueError):
    """A malformed bucket description (one line)."""


_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _number(text, what):
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text.lower())
    if not m:
        raise RateLimitError(f"{what}: bad number {text!r}")
    return int(m.group(1)) * _SUFFIX[m.group(2)]


class TokenBucket:
    def __init__(self, size, refill_time, one_time_burst=0, clock=time.monotonic,
                 what="token bucket"):
        if any(not isinstance(v, int) or isinstance(v, bool)
               for v in (size, refill_time, one_time_burst)):
            raise RateLimitError(f"{what}: size, refill_time and one_time_burst are integers")
        if size <= 0 or refill_time <= 0 or one_time_burst < 0:
            raise RateLimitError(f"{what}: size and refill_time must be positive, "
                                 "one_time_burst not negative")
        self.size = size
        self.refill_time = refill_time          # ms
        self.one_time_burst = one_time_burst
        self.budget = float(size)
        self._clock = clock
        self._last = clock()

    @property
    def rate(self):
        """Tokens per second."""
        return self.size * 1000.0 / self.refill_time

    def _refill(self):
        now = self._clock()
        self.budget = min(float(self.size), self.budget + (now - self._last) * self.rate)
        self._last = now

    def wait_for(self, tokens):
        """0 if `tokens` can be taken now, else the seconds until they can."""
        self._refill()
        have = self.one_time_burst + self.budget
        if tokens <= have:
            return 0.0
        if tokens > self.size + self.one_time_burst:     # over-consumption: wait for full
            if self.budget >= self.size:
                return 0.0
            need = self.size - self.budget
        else:
            need = tokens - have
        return max(need / self.rate, 1e-4)

    def take(self, tokens):
        """Take `tokens` (after wait_for said 0, or a full bucket for an
        oversized request: the rest is owed as a negative budget)."""
        burst = min(self.one_time_burst, tokens)
        self.one_time_burst -= burst
        self.budget -= tokens - burst

    def to_dict(self):
        return {"size": self.size, "one_time_burst": self.one_time_burst,
                "refill_time": self.refill_time}

    @classmethod
    def parse(cls, text, what="bucket"):
        """SIZE:REFILL_MS[:BURST]."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise RateLimitError(f"{what}: expected SIZE:REFILL_MS[:BURST], got {text!r}")
        size = _number(parts[0], what)
        refill = _number(parts[1].lower().removesuffix("ms"), what)
        burst = _number(parts[2], what) if len(parts) == 3 else 0
        return cls(size, refill, burst, what=what)

    @classmethod
    def from_dict(cls, d, what="bucket"):
        if d is None:
            return None
        if not isinstance(d, dict):
            raise RateLimitError(f"{what}: expected an object")
        unknown = set(d) - {"size", "one_time_burst", "refill_time"}
        if unknown:
            raise RateLimitError(f"{what}: unknown field {sorted(unknown)[0]!r}")
        if "size" not in d or "refill_time" not in d:
            raise RateLimitError(f"{what}: size and refill_time are required")
        return cls(d["size"], d["refill_time"], d.get("one_time_burst", 0) or 0, what=what)


class RateLimiter:
    """Bandwidth and ops buckets; thread-safe (update() comes from the API)."""

    def __init__(self, bandwidth=None, ops=None):
        self.bandwidth = bandwidth
        self.ops = ops
        self._lock = threading.Lock()
        self.throttled = 0            # times a request had to wait

    @property
    def active(self):
        return self.bandwidth is not None or self.ops is not None

    def consume(self, nbytes, nops=1):
        """Take the request's tokens from both buckets and return 0, or take
        nothing and return the seconds to wait before trying again."""
        with self._lock:
            bw, ops = self.bandwidth, self.ops
            wait = 0.0
            if bw is not None and nbytes:
                wait = bw.wait_for(nbytes)
            if ops is not None and nops:
                wait = max(wait, ops.wait_for(nops))
            if wait:
                self.throttled += 1
                return wait
            if bw is not None and nbytes:
                bw.take(nbytes)
            if ops is not None and nops:
                ops.take(nops)
            return 0.0

    def update(self, bandwidth=False, ops=False):
        """Replace a bucket (False: keep it, None: remove it); as Firecracker's
        PATCH, a new bucket starts full."""
        with self._lock:
            if bandwidth is not False:
                self.bandwidth = bandwidth
            if ops is not False:
                self.ops = ops

    def to_dict(self):
        return {"bandwidth": self.bandwidth and self.bandwidth.to_dict(),
                "ops": self.ops and self.ops.to_dict()}

    @classmethod
    def from_dict(cls, d, what="rate_limiter"):
        """Firecracker's RateLimiter object (or None)."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise RateLimitError(f"{what}: expected an object")
        unknown = set(d) - {"bandwidth", "ops"}
        if unknown:
            raise RateLimitError(f"{what}: unknown field {sorted(unknown)[0]!r}")
        lim = cls(TokenBucket.from_dict(d.get("bandwidth"), f"{what}.bandwidth"),
                  TokenBucket.from_dict(d.get("ops"), f"{what}.ops"))
        return lim if lim.active else None

    @classmethod
    def from_options(cls, bw=None, ops=None):
        """From the CLI's bw=/ops= strings (either may be None)."""
        lim = cls(TokenBucket.parse(bw, "bw") if bw else None,
                  TokenBucket.parse(ops, "ops") if ops else None)
        return lim if lim.active else None
