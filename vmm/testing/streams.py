"""Keep a mock driver's queue full for a while and count what completes:
the rate-limiter tests and bench/faults.py measure with these.

    s = BlkStream(blk_driver, typ=T_IN, nbytes=65536, depth=32)
    requests, nbytes, seconds = s.run(3.0)

Buffers are allocated once and reused (the arena never runs out); the
device may complete requests from another thread (a rate limiter's timer),
so completions are polled.
"""
import struct
import time

from vmm.testing.mockdriver import T_IN, T_OUT


class BlkStream:
    def __init__(self, drv, typ=T_IN, nbytes=65536, depth=32, sector=0):
        self.drv, self.typ, self.nbytes, self.depth = drv, typ, nbytes, depth
        self.slots = []
        data = drv.alloc(nbytes, 16, fill=0x11)      # shared by every request
        for _ in range(depth):
            hdr = drv.alloc(16, 16)
            drv.mem.write(hdr, struct.pack("<IIQ", typ, 0, sector))
            status = drv.alloc(1, 1)
            self.slots.append((hdr, status))
        self.data = data
        self.inflight = {}                           # head -> slot

    def _offer(self, slot):
        hdr, status = slot
        segs = [(hdr, 16, False)]
        if self.nbytes:
            segs.append((self.data, self.nbytes, self.typ == T_IN))
        segs.append((status, 1, True))
        head = self.drv.queues[0].add(segs, publish=False)
        self.inflight[head] = slot

    def reap(self):
        done = self.drv.queues[0].get_used()
        free = [self.inflight.pop(h) for h, _ in done]
        return len(done), free

    def run(self, seconds, data_only=True, rate_window=None):
        """Keep `depth` requests queued for `seconds`; (requests, bytes, elapsed)."""
        free = list(self.slots)
        count = 0
        q = self.drv.queues[0]
        t0 = time.monotonic()
        end = t0 + seconds
        while True:
            for slot in free:
                self._offer(slot)
            if free:
                q.publish()
                self.drv.kick(0)
            n, free = self.reap()
            count += n
            now = time.monotonic()
            if now >= end:
                break
            if not n:
                time.sleep(0.0005)
        elapsed = time.monotonic() - t0
        # drain what is still queued so the device is idle afterwards
        deadline = time.monotonic() + 5
        while self.inflight and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.001)
        return count, count * self.nbytes, elapsed


__all__ = ["BlkStream", "T_IN", "T_OUT"]
