"""Example pyvmm hooks: Python that sees, and may decide, each disk request
and each network frame of a running guest.

    pyvmm run --drive file=disk.img,hook=examples/hooks.py:FlakyDisk \\
              --net tap=tap0,hook=examples/hooks.py:PacketLog

A hook is any object with some of these methods (see vmm/virtio/hooks.py);
they run on the device's I/O thread, one call per request, only while a hook
is installed (the C fast path is used otherwise):

    blk_request(req) -> None | "ioerr" | "unsupp" | seconds_of_delay
    blk_done(req, status)
    net_frame(direction, frame) -> None | "drop" | replacement_bytes
"""
import struct
import sys
import time


class FlakyDisk:
    """Fails every 100th write to the first MiB (a flaky disk region), delays
    flushes by 10 ms, and counts what the guest does."""

    def __init__(self):
        self.writes = 0
        self.counts = {}

    def blk_request(self, req):
        self.counts[req.kind] = self.counts.get(req.kind, 0) + 1
        if req.kind == "write" and req.sector < 2048:
            self.writes += 1
            if self.writes % 100 == 0:
                return "ioerr"                  # the guest sees VIRTIO_BLK_S_IOERR
        if req.kind == "flush":
            return 0.010                        # completes 10 ms later
        return None                             # as usual

    def blk_done(self, req, status):
        if status:
            print(f"hook: {req.kind} at sector {req.sector} failed ({status})",
                  file=sys.stderr)


class PacketLog:
    """Prints a line per IPv4 frame and drops every ICMP echo request whose
    sequence number is odd (a selective, reproducible loss)."""

    def net_frame(self, direction, frame):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return None
        ihl = (frame[14] & 0xF) * 4
        src, dst = frame[26:30], frame[30:34]
        proto = frame[23]
        print(f"{time.time():.6f} {direction} {'.'.join(map(str, src))} -> "
              f"{'.'.join(map(str, dst))} proto {proto} len {len(frame)}", file=sys.stderr)
        if proto == 1 and len(frame) >= 14 + ihl + 8:
            typ, _, _, _, seq = struct.unpack_from("!BBHHH", frame, 14 + ihl)
            if typ == 8 and seq % 2:
                return "drop"
        return None
