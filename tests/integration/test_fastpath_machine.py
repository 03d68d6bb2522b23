"""The I/O thread's C fast path in a real Machine (KVM, irqfd and ioeventfd
registered with KVM, the machine's per-device I/O thread): a disk's kicks
are served in C, `--drive ...,poll_us=` reaches it, Machine.pause() parks
it and resume() lets the waiting request through.  (Under the seccomp
filters it runs in every default-guest disk test: `pyvmm run` confines the
I/O threads by default.)"""
import os

import pytest

import vmm.testing.tinyguest as T
from vmm.devices import DeviceSpecError, DriveSpec
from vmm.machine import Machine, MachineConfig
from vmm.testing.mockdriver import BlkDriver, T_IN
from vmm.testing.waiting import SLOW, barrier
from vmm.virtio.fastpath import DEFAULT_POLL_US
from vmm.virtio.ioloop import signal_eventfd

pytestmark = pytest.mark.usefixtures("needs_kvm")



def test_poll_us_option_is_checked(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    assert DriveSpec(f"file={img},poll_us=50").poll_us == 50
    assert DriveSpec(f"file={img}").poll_us == DEFAULT_POLL_US
    assert DriveSpec(f"file={img},poll_us=0").poll_us == 0
    for bad in ("-1", "x", "5000"):
        with pytest.raises(DeviceSpecError, match="poll_us"):
            DriveSpec(f"file={img},poll_us={bad}")


def test_machine_disk_on_fast_path_pauses_and_resumes(tmp_path):
    img = tmp_path / "a.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    kernel = T.make_elf(T.CLI_HLT, str(tmp_path / "guest.elf"))
    spec = DriveSpec(f"file={img},poll_us=20")
    serial = open(tmp_path / "serial", "wb")
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, devices=[spec], serial_out=serial))
    try:
        t = spec.transport
        loop = t._ioloop
        assert t._fast is not None and t._fast._q[0].poll_us == 20
        d = BlkDriver(t, m.memory, arena=0x100000)
        assert d.init() and t._fast.enabled(0)
        q = d.queues[0]
        for i in range(8):
            req = d.submit(T_IN, 8 * i, read_len=4096)
            signal_eventfd(t.notify_fds[0])       # the guest's QueueNotify, as KVM signals it
            assert len(q.wait_used(1, SLOW)) == 1
            assert d.result(req) == (0, data[4096 * i:4096 * (i + 1)])
        barrier(loop)         # C counts a kick and its requests after pushing them
        assert loop.fast_counts[1] >= 7           # served in C, no Python handler
        assert spec.transport.device.stats["requests"] == 8

        m.pause()
        req = d.submit(T_IN, 64, read_len=512)
        signal_eventfd(t.notify_fds[0])
        assert q.wait_used(1, 0.3) == []         # parked: nothing completes
        m.resume()
        assert len(q.wait_used(1, SLOW)) == 1
        assert d.result(req) == (0, data[32768:33280])
    finally:
        m.close()
        serial.close()
