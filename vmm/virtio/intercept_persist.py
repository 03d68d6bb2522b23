"""Snapshots of the request slow path (intercept.py, intercept_net.py) and
of virtio-rng's limiter: what a restore needs to carry on as before.

Two halves:

- `options(...)`: the settings as the option strings of `--drive` / `--net`
  / `--rng` (faults=SPEC, trace=/pcap=PATH, bw=/ops=/rx-bw=/... as
  SIZE:REFILL_MS:BURST), taken from the device as it is now (so a PATCH
  through the API is included).  They go into the snapshot's device
  options; the restore builds the device from them as from a command line.
  Traces are reopened in append mode (a restore adds to the file).
- `state(...)` / `restore(...)`: the live counters.  Each token bucket's
  current budget and what is left of its one-time burst (the restored
  bucket continues from that budget and refills from the restore on:
  time while the VM was saved does not count, as a paused VM's would not);
  for fault rules, each rule's hit count (times=N) and the random
  generator's state, so the sequence of injected faults continues; a NIC's
  link state.

Not carried, and why:
- a hook (hook=SOURCE:NAME) is arbitrary Python with its own state, which
  cannot be saved: a device with a hook is refused (one line);
- a disk request held by an injected delay has left the ring but is not
  complete: a snapshot while one is in flight is refused (one line: take
  it again a moment later); NIC frames held by a delay are dropped, as a
  lossy link would (the guest's network stack retransmits).
A request a limiter throttled is back on the ring, so nothing is lost:
restart() looks at every queue.
"""
import os


def bucket_text(b):
    return f"{b.size}:{b.refill_time}:{b.one_time_burst}"


def limiter_options(lim, bw_key, ops_key):
    out = {}
    if lim is not None and lim.bandwidth is not None:
        out[bw_key] = bucket_text(lim.bandwidth)
    if lim is not None and lim.ops is not None:
        out[ops_key] = bucket_text(lim.ops)
    return out


def _writer_path(w):
    """Absolute: the restore may run in another directory."""
    return None if w is None else os.path.abspath(w.path)


def check(icpt):
    """Refuse what cannot be saved (NotImplementedError, one line)."""
    if icpt is None:
        return
    if icpt.hook is not None:
        raise NotImplementedError("a device with a hook= does not support snapshots (the "
                                  "hook's Python state cannot be saved)")
    if getattr(icpt, "delayed", 0):
        raise NotImplementedError(f"{icpt.delayed} disk requests are held by an injected "
                                  "delay: resume the VM and snapshot again once they completed")


def blk_options(icpt):
    if icpt is None:
        return {}
    check(icpt)
    out = limiter_options(icpt.limiter, "bw", "ops")
    if icpt.faults is not None:
        out["faults"] = icpt.faults.spec
    if icpt.tracer is not None:
        out["trace"] = _writer_path(icpt.tracer)
    return out


def net_options(icpt):
    if icpt is None:
        return {}
    check(icpt)
    out = limiter_options(icpt.rx_limiter, "rx-bw", "rx-ops")
    out.update(limiter_options(icpt.tx_limiter, "tx-bw", "tx-ops"))
    if icpt.faults is not None:
        out["faults"] = icpt.faults.spec
    if icpt.pcap is not None:
        out["pcap"] = _writer_path(icpt.pcap)
    return out


# --- live counters -------------------------------------------------------
def limiter_state(lim):
    if lim is None:
        return None
    out = {}
    for name in ("bandwidth", "ops"):
        b = getattr(lim, name)
        if b is not None:
            b._refill()
            out[name] = {"budget": b.budget, "one_time_burst": b.one_time_burst}
    return out


def restore_limiter(lim, st):
    if lim is None or not st:
        return
    for name, saved in st.items():
        b = getattr(lim, name, None)
        if b is None:
            continue
        b.budget = min(float(saved["budget"]), float(b.size))
        b.one_time_burst = max(0, int(saved["one_time_burst"]))
        b._last = b._clock()


def _faults_state(f):
    if f is None:
        return None
    with f._lock:
        version, internal, gauss = f._rng.getstate()
        return {"spec": f.spec, "hits": [r.hits for r in f.rules],
                "rng": [version, list(internal), gauss],
                "link_up": getattr(f, "link_up", True)}


def _restore_faults(f, st):
    if f is None or not st or st.get("spec") != f.spec:
        return                          # other rules than the snapshot's: start afresh
    with f._lock:
        for r, hits in zip(f.rules, st["hits"]):
            r.hits = int(hits)
        version, internal, gauss = st["rng"]
        f._rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        if hasattr(f, "link_up"):
            f.link_up = bool(st.get("link_up", True))


def state(icpt):
    if icpt is None:
        return None
    names = ("limiter",) if hasattr(icpt, "limiter") else ("rx_limiter", "tx_limiter")
    return {"limiters": {n: limiter_state(getattr(icpt, n)) for n in names},
            "faults": _faults_state(icpt.faults)}


def restore(icpt, st):
    if icpt is None or not st:
        return
    for n, lst in (st.get("limiters") or {}).items():
        restore_limiter(getattr(icpt, n, None), lst)
    _restore_faults(icpt.faults, st.get("faults"))


__all__ = ["blk_options", "check", "limiter_options", "limiter_state", "net_options",
           "restore", "restore_limiter", "state"]
