"""Traces of what a guest asked for: frames as pcap, disk requests and
vCPU exits as JSON lines.

    PcapWriter(path)        `--net ...,pcap=FILE`: classic libpcap format
                            (magic a1b2c3d4, v2.4, LINKTYPE_ETHERNET),
                            readable by tcpdump -r and wireshark; every frame
                            the guest sends (as sent, before injected faults)
                            and every frame it receives (as delivered)
    BlkTracer(path)         `--drive ...,trace=FILE`: one JSON object a line:
                            {"t": unix time, "queue": 0, "type": "read",
                             "sector": 8, "bytes": 4096, "status": "ok",
                             "latency_us": 12.5[, "fault": "read-error"]}
    TracedBus(bus, kind, f) `--trace-exits FILE`: {"t":..,"kind":"pio"|"mmio",
                            "addr":..,"size":..,"dir":"read"|"write",
                            "value":..,"device":"VirtioMmio"}

Writers are line-buffered files shared by threads under a lock; they cost
nothing when not configured (nothing is installed on the fast path).
"""
import json
import os
import struct
import threading
import time

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

BLK_TYPES = {0: "read", 1: "write", 4: "flush", 8: "get-id", 11: "discard",
             13: "write-zeroes"}
BLK_STATUS = {0: "ok", 1: "ioerr", 2: "unsupp"}


class TraceError(ValueError):
    """A trace file that cannot be written (one line)."""


def _open(path, what, append=False):
    try:
        return open(path, "ab" if append else "wb")
    except OSError as e:
        raise TraceError(f"cannot open {what} {path}: {e.strerror}") from None


class _TraceFile:
    """A trace file shared by threads: writes, flush and close under one lock;
    writes after close() are dropped."""

    def __init__(self, path, what, append=False):
        self.path = os.fspath(path)
        self._f = _open(self.path, what, append)
        self._lock = threading.Lock()

    def flush(self):
        with self._lock:
            if self._f is not None:
                self._f.flush()

    def close(self):
        with self._lock:
            f, self._f = self._f, None
        if f is not None:
            f.close()


class PcapWriter(_TraceFile):
    def __init__(self, path, append=False):
        super().__init__(path, "pcap file", append)
        if not self._f.tell():          # appending (a restore): the header is there
            self._f.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN,
                                      LINKTYPE_ETHERNET))
        self._f.flush()
        self.frames = 0

    def write(self, frame, ts=None):
        """One Ethernet frame (without the virtio_net_hdr)."""
        ts = time.time() if ts is None else ts
        sec = int(ts)
        usec = int((ts - sec) * 1e6)
        n = len(frame)
        cap = min(n, SNAPLEN)
        with self._lock:
            if self._f is None:
                return
            self._f.write(struct.pack("<IIII", sec, usec, cap, n))
            self._f.write(frame[:cap])
            self.frames += 1


def read_pcap(path):
    """[(timestamp, frame bytes)] of a pcap file written by PcapWriter (tests)."""
    with open(path, "rb") as f:
        data = f.read()
    magic, major, minor, _, _, _, link = struct.unpack_from("<IHHiIII", data, 0)
    if magic != PCAP_MAGIC or (major, minor) != (2, 4) or link != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: not an Ethernet pcap file")
    out, off = [], 24
    while off + 16 <= len(data):
        sec, usec, cap, _ = struct.unpack_from("<IIII", data, off)
        off += 16
        out.append((sec + usec / 1e6, data[off:off + cap]))
        off += cap
    return out


class JsonLines(_TraceFile):
    """A file of one JSON object per line, shared by threads."""

    def __init__(self, path, what, append=False):
        super().__init__(path, what, append)
        self.lines = 0

    def write(self, obj):
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._f is not None:
                self._f.write(line)
                self.lines += 1


class BlkTracer(JsonLines):
    def __init__(self, path, append=False):
        super().__init__(path, "trace file", append)

    def request(self, start, typ, sector, nbytes, status, fault=None, queue=0):
        now = time.time()
        rec = {"t": round(now, 6), "queue": queue, "type": BLK_TYPES.get(typ, str(typ)),
               "sector": sector, "bytes": nbytes, "status": BLK_STATUS.get(status, str(status)),
               "latency_us": round((time.monotonic() - start) * 1e6, 1)}
        if fault:
            rec["fault"] = fault
        self.write(rec)


class TracedBus:
    """A Bus seen through a tracer: every access is logged, then forwarded.
    Installed on a vCPU's exit loop only with --trace-exits."""

    def __init__(self, bus, kind, out):
        self.bus, self.kind, self.out = bus, kind, out

    def _log(self, addr, size, direction, value):
        dev, _ = self.bus.find(addr)
        name = None
        if dev is not None:
            name = type(dev).__name__
            inner = getattr(dev, "device", None)     # a virtio transport: name the device
            if inner is not None:
                name = f"{name}:{type(inner).__name__}"
        self.out.write({"t": round(time.time(), 6), "kind": self.kind, "addr": addr,
                        "size": size, "dir": direction, "value": value, "device": name})

    def read(self, addr, size):
        value = self.bus.read(addr, size)
        self._log(addr, size, "read", value)
        return value

    def write(self, addr, size, value):
        self._log(addr, size, "write", value)
        self.bus.write(addr, size, value)


class ExitTraceSpec:
    """`--trace-exits FILE`, carried in the machine's device list: attach()
    opens the file and hands it to the vCPU threads (machine.exit_tracer),
    close() closes it after they stopped."""

    def __init__(self, path, append=False):
        self.path = path
        self.append = append            # a restore adds to the file
        self.out = None

    def snapshot_options(self):
        return {"kind": "trace-exits", "path": os.path.abspath(self.path)}

    def attach(self, machine, cmdline):
        self.out = JsonLines(self.path, "exit trace file", self.append)
        machine.exit_tracer = self.out
        return cmdline

    def close(self):
        if self.out is not None:
            self.out.close()
            self.out = None
