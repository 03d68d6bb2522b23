"""A snapshot of a virtio-blk disk on io_uring (io_engine=io_uring): the
requests still in flight in the kernel complete before the queue state is
taken (none is lost, none is done twice after the restore), and the
restore reopens the disk on io_uring."""
import os

import pytest

from vmm import snapshot as S
from vmm.devices import DriveSpec, spec_from_options
from vmm.testing.mockdriver import T_IN, BlkDriver
from vmm.virtio import blk_uring
from vmm.virtio.blk import BlkDevice
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio

ok, why = blk_uring.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"io_uring unavailable here: {why}")


def test_requests_in_flight_complete_before_the_state_is_taken(mem, image):
    loop = IoLoop()                     # never started: nothing reaps completions but the snapshot
    dev = BlkDevice(image, io_engine="io_uring", ioloop=loop)
    t = VirtioMmio(dev, mem)
    d = BlkDriver(t, mem)
    try:
        assert d.init()
        fd = os.open(image, os.O_RDONLY)
        os.fsync(fd)                                   # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # reads go to the disk: async
        os.close(fd)
        reqs = [d.submit(T_IN, sector=64 * i, read_len=4096) for i in range(4)]
        d.kick()
        if not dev._engines[0].inflight:               # submitted, not reaped
            pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
        st = S.unpack_state(S.pack_state({"arch": S.ARCH, "x": t.state()}))["x"]
        assert dev._engines[0].inflight == 0
        assert st["queues"][0]["next_avail"] == st["queues"][0]["next_used"] == 4
        used = dict(d.queues[0].get_used())
        with open(image, "rb") as f:
            disk = f.read()
        for i, r in enumerate(reqs):
            assert r.head in used and d.result(r) == (0, disk[i * 32768:i * 32768 + 4096])
    finally:
        t.close()
        loop.close()


def test_io_engine_is_kept_in_the_device_options(image):
    spec = DriveSpec(f"file={image},io_engine=io_uring")
    opts = spec.snapshot_options()
    assert opts["io_engine"] == "io_uring"
    assert spec_from_options(opts).io_engine == "io_uring"
    assert "io_engine" not in DriveSpec(f"file={image}").snapshot_options()
