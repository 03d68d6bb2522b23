"""Metrics in Firecracker's shape: one JSON object per line, written to the
file or named pipe given by PUT /metrics (or --metrics-path), every
FLUSH_INTERVAL seconds and on the FlushMetrics action.

As in Firecracker, counters are deltas since the previous line (its
SharedIncMetric), under the same top-level keys: `api_server`,
`get_api_requests`/`put_api_requests`/`patch_api_requests`, `block` and one
`block_<drive_id>` per drive, `net` and `net_<iface_id>`, `vcpu`, `i8042`,
plus `utc_timestamp_ms`.  Block and net counters come from the
device models (vmm/virtio/blk.py stats, native/src/net.c counters); where
pyvmm counts something Firecracker does not split (blk requests are not
split into reads and writes), the pyvmm name is used.
"""
import json
import os
import threading
import time

FLUSH_INTERVAL = 60.0      # seconds, Firecracker's periodic flush


class Metrics:
    def __init__(self, startup_us=0, startup_cpu_us=0):
        self.path = None
        self._fd = None
        self._lock = threading.Lock()
        self._last = {}
        self._last_flush = time.monotonic()
        self.api = {"get_api_requests": {}, "put_api_requests": {}, "patch_api_requests": {}}
        self.startup = {"process_startup_time_us": startup_us,
                        "process_startup_time_cpu_us": startup_cpu_us}
        self.lines = 0

    @property
    def configured(self):
        return self._fd is not None

    def configure(self, path):
        """Open the metrics file (append) or FIFO (non-blocking, as Firecracker)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
        with self._lock:
            if self._fd is not None:
                os.close(fd)
                raise ValueError("the metrics system is already initialized")
            self._fd, self.path = fd, path

    def count_request(self, method, resource, ok):
        if not resource:
            return
        group = self.api.get(f"{method.lower()}_api_requests")
        if group is None:
            return
        with self._lock:
            group[f"{resource}_count"] = group.get(f"{resource}_count", 0) + 1
            if not ok:
                group[f"{resource}_fails"] = group.get(f"{resource}_fails", 0) + 1

    def due(self, interval=FLUSH_INTERVAL):
        return self.configured and time.monotonic() - self._last_flush >= interval

    def snapshot(self, machine):
        """Cumulative counters now (not yet deltas)."""
        with self._lock:
            snap = {k: dict(v) for k, v in self.api.items()}
        snap["api_server"] = dict(self.startup)
        if machine is None:
            return snap
        block_total, net_total = {}, {}
        for dev in machine.config.devices:
            d = getattr(dev, "device", None)
            if hasattr(dev, "drive_id") and d is not None:
                s = d.stats
                m = {"queue_event_count": s["kicks"], "request_count": s["requests"],
                     "execute_fails": s["ioerr"], "update_count": getattr(dev, "updates", 0)}
                snap[f"block_{dev.drive_id}"] = m
                _add(block_total, m)
            elif hasattr(dev, "iface_id") and d is not None:
                s = d.stats
                m = {"rx_bytes_count": s["rx_bytes"], "rx_packets_count": s["rx_packets"],
                     "rx_fails": s["rx_errors"], "rx_dropped": s["rx_drops"],
                     "tx_bytes_count": s["tx_bytes"], "tx_packets_count": s["tx_packets"],
                     "tx_fails": s["tx_errors"], "tx_dropped": s["tx_drops"],
                     "rx_queue_event_count": d.kicks[0], "tx_queue_event_count": d.kicks[1]}
                snap[f"net_{dev.iface_id}"] = m
                _add(net_total, m)
        snap["block"], snap["net"] = block_total, net_total
        vcpu = {}
        for t in machine.threads:
            _add(vcpu, {f"exit_{k}": v for k, v in t.exit_counts.items()})
        snap["vcpu"] = vcpu
        snap["i8042"] = dict(machine.i8042.counts)
        return snap

    def flush(self, machine):
        """Write one line of deltas; returns it (as a dict)."""
        if not self.configured:
            raise ValueError("the metrics system is not initialized (PUT /metrics first)")
        snap = self.snapshot(machine)
        with self._lock:
            line = {"utc_timestamp_ms": int(time.time() * 1000)}
            for group, values in snap.items():
                if group == "api_server":    # startup times are reported as they are
                    line[group] = values
                    continue
                last = self._last.get(group, {})
                line[group] = {k: v - last.get(k, 0) for k, v in values.items()}
            self._last = snap
            self._last_flush = time.monotonic()
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            try:
                os.write(self._fd, data)
            except BlockingIOError:
                pass          # a FIFO nobody reads: drop the line, as Firecracker does
            self.lines += 1
        return line

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _add(total, values):
    for k, v in values.items():
        total[k] = total.get(k, 0) + v
