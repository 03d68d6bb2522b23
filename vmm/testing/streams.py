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
    def __init__(self, drv, typ=T_IN, nbytes=65536, depth=32, sector=0, indirect=False):
        """`indirect`: each request one ring descriptor (an indirect table,
        allocated per request from the driver's arena), so up to the queue
        size of them can be in flight instead of a third of it."""
        self.drv, self.typ, self.nbytes, self.depth = drv, typ, nbytes, depth
        self.indirect = indirect
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
        head = self.drv.queues[0].add(segs, indirect=self.indirect, publish=False)
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
        deadline = time.monotonic() + 30
        while self.inflight and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.001)
        return count, count * self.nbytes, elapsed




BATCH = 128


class BatchBlkDriver:
    """virtio-blk reads in batches of BATCH (one QueueNotify each, each request
    an indirect descriptor of header, data, status, as Linux does), from
    fixed slots so a batch costs a few numpy operations: what is timed is
    the device (bench/faults.py)."""

    def __init__(self, dev, mem, req_len):
        import numpy as np
        from vmm.testing.mockdriver import MockDriver
        from vmm.virtio import mmio as m
        from vmm.virtio.mmio import VirtioMmio
        from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
        self.m, self.mem = m, mem
        self.t = VirtioMmio(dev, mem)
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=48 << 20)
        if not self.d.init():
            raise RuntimeError("feature negotiation failed")
        self.q = q = self.d.queues[0]
        d = self.d
        hdr_gpa = d.alloc(16 * BATCH, 16)
        data_gpa = d.alloc(req_len * BATCH, 4096)
        status_gpa = d.alloc(BATCH, 16)
        tables = d.alloc(48 * BATCH, 16)
        for k in range(BATCH):
            t = tables + 48 * k
            q.write_desc(0, hdr_gpa + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=t)
            q.write_desc(1, data_gpa + req_len * k, req_len,
                         VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2, table=t)
            q.write_desc(2, status_gpa + k, 1, VRING_DESC_F_WRITE, 0, table=t)
            q.write_desc(k, t, 48, VRING_DESC_F_INDIRECT)
        hdr = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])
        self.headers = mem.view(hdr_gpa, 16 * BATCH).view(hdr)
        self.headers["type"] = 0                     # VIRTIO_BLK_T_IN
        self.status = mem.view(status_gpa, BATCH)
        off = mem.offset(q.avail)
        arr = mem.array
        self.avail_ring = arr[off + 4:off + 4 + 2 * q.size].view("<u2")
        self.avail_idx = arr[off + 2:off + 4].view("<u2")
        self.used_event = arr[off + 4 + 2 * q.size:off + 6 + 2 * q.size].view("<u2")
        uoff = mem.offset(q.used)
        self.used_idx = arr[uoff + 2:uoff + 4].view("<u2")
        self.slots = np.arange(BATCH, dtype=np.uint16)
        self.idx = 0

    def run(self, sectors):
        """Read at every sector (a multiple of BATCH of them), batch by batch."""
        m, size = self.m, self.q.size
        for start in range(0, len(sectors), BATCH):
            self.headers["sector"] = sectors[start:start + BATCH]
            self.status[:] = 0xFF
            self.avail_ring[(self.idx + self.slots) % size] = self.slots
            self.idx = (self.idx + BATCH) & 0xFFFF
            self.used_event[0] = self.idx
            self.avail_idx[0] = self.idx
            self.t.write(m.QUEUE_NOTIFY, 4, 0)
            if self.used_idx[0] != self.idx or self.status.any():
                raise RuntimeError(f"batch failed: used {self.used_idx[0]} != {self.idx}")
            self.t.write(m.INTERRUPT_ACK, 4, self.t.read(m.INTERRUPT_STATUS, 4))

    def close(self):
        self.t.close()


class FixedRing:
    """numpy views of one queue: slot k = descriptor k = buffer k (bench/faults.py)."""

    def __init__(self, d, q, buf_len, writable, mem):
        import numpy as np
        from vmm.virtio.queue import VRING_DESC_F_WRITE
        self.q, self.mem = q, mem
        self.data = d.alloc(buf_len * q.size, 4096)
        for k in range(q.size):
            q.write_desc(k, self.data + buf_len * k, buf_len, VRING_DESC_F_WRITE if writable else 0)
        a, u = mem.offset(q.avail), mem.offset(q.used)
        arr = mem.array
        self.ring = arr[a + 4:a + 4 + 2 * q.size].view("<u2")
        self.avail_idx = arr[a + 2:a + 4].view("<u2")
        self.used_event = arr[a + 4 + 2 * q.size:a + 6 + 2 * q.size].view("<u2")
        self.used_idx = arr[u + 2:u + 4].view("<u2")
        self.idx = 0
        self.pos = np.arange(q.size, dtype=np.uint32)

    def post(self, n):
        p = (self.idx + self.pos[:n]) & 0xFFFF
        self.ring[p % self.q.size] = p % self.q.size
        self.idx = (self.idx + n) & 0xFFFF
        self.used_event[0] = self.idx
        self.avail_idx[0] = self.idx
