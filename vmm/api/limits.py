"""Firecracker's rate_limiter objects on drives, network interfaces and the
entropy device (issue #12), between the API and vmm/virtio/ratelimit.py.

    {"bandwidth": {"size": 10485760, "one_time_burst": 0, "refill_time": 1000},
     "ops": {"size": 1000, "refill_time": 1000}}

A bucket with size 0 or refill_time 0 is no bucket (Firecracker's
"disabled").  On PATCH a bucket left out keeps its current setting, one given
replaces it (starting full), one disabled is removed; the change applies to
the running device at once (a paused queue is re-run).

PATCH also takes pyvmm's `faults` field (not Firecracker's): a fault SPEC
for the running disk or NIC, "" for none.
"""
from vmm.api.schema import ApiError
from vmm.virtio.ratelimit import RateLimiter, RateLimitError, TokenBucket

BUCKETS = ("bandwidth", "ops")


def _bucket(d, what):
    """TokenBucket, or None for a disabled bucket."""
    if not isinstance(d, dict):
        raise ApiError(f"{what}: expected an object")
    if d.get("size") == 0 or d.get("refill_time") == 0:
        return None
    try:
        return TokenBucket.from_dict(d, what)
    except RateLimitError as e:
        raise ApiError(str(e)) from None


def _check(d, what):
    if not isinstance(d, dict):
        raise ApiError(f"{what}: expected an object")
    unknown = set(d) - set(BUCKETS)
    if unknown:
        raise ApiError(f"{what}: unknown field `{sorted(unknown)[0]}` "
                       f"(expected one of: bandwidth, ops)")


def from_api(d, what):
    """A RateLimiter from a PUT body's object (None: no limiter)."""
    if d is None:
        return None
    _check(d, what)
    lim = RateLimiter(*(_bucket(d[k], f"{what}.{k}") if d.get(k) is not None else None
                        for k in BUCKETS))
    return lim if lim.active else None


def patched(current, d, what):
    """The limiter after a PATCH `d` on `current` (either may be None)."""
    _check(d, what)
    new = {k: _bucket(d[k], f"{what}.{k}") for k in BUCKETS if d.get(k) is not None}
    if current is None:
        lim = RateLimiter(new.get("bandwidth"), new.get("ops"))
    else:
        current.update(bandwidth=new.get("bandwidth", False), ops=new.get("ops", False))
        lim = current
    return lim if lim.active else None


def to_api(lim):
    """The object GET /vm/config shows (None: none)."""
    if lim is None:
        return None
    return {k: v for k, v in lim.to_dict().items() if v is not None}


def faults_from_api(spec, kind, what):
    """pyvmm's `faults` extension on PATCH: a SPEC string (vmm/virtio/faults.py)
    for the running device; "" removes every rule."""
    from vmm.virtio.faults import DiskFaults, FaultSpecError, NetFaults
    try:
        f = (DiskFaults if kind == "disk" else NetFaults)(spec)
    except FaultSpecError as e:
        raise ApiError(f"{what}: {e}") from None
    return None if f.noop else f
