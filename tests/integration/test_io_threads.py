"""Issue #14: each device has its own I/O thread (Cloud Hypervisor's model),
so a disk whose FLUSH blocks does not stall another device, and
Machine.close() is bounded: a stuck I/O thread is reported and left (its
device open, guest memory mapped), as a stuck vCPU thread is."""
import threading
import time

import pytest

import vmm.machine as machine_mod
import vmm.testing.tinyguest as T
from vmm.devices import DriveSpec
from vmm.machine import Machine, MachineConfig
from vmm.native import ffi, lib
from vmm.testing.mockdriver import BlkDriver, T_FLUSH, T_IN
from vmm.testing.waiting import SLOW, until
from vmm.virtio.ioloop import signal_eventfd

pytestmark = pytest.mark.usefixtures("needs_kvm")



def test_blocked_flush_does_not_stall_other_disk_and_close_is_bounded(tmp_path, monkeypatch):
    imgs = []
    for name in ("a.img", "b.img"):
        p = tmp_path / name
        p.write_bytes(bytes(range(256)) * 4096)
        imgs.append(str(p))
    kernel = T.make_elf(T.CLI_HLT, str(tmp_path / "guest.elf"))
    specs = [DriveSpec(f"file={p}") for p in imgs]
    serial = open(tmp_path / "serial", "wb")
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, devices=specs, serial_out=serial))
    release, entered = threading.Event(), threading.Event()
    a_fd = specs[0].transport.device.fd

    @ffi.callback("void(int)")
    def hook(fd):
        if fd == a_fd:
            entered.set()
            release.wait(120)
    lib.pv_blk_flush_hook = hook
    try:
        loops = {spec: spec.transport._ioloop for spec in specs}
        assert loops[specs[0]] is not loops[specs[1]]          # one thread per device
        da = BlkDriver(specs[0].transport, m.memory, arena=0x100000)
        db = BlkDriver(specs[1].transport, m.memory, arena=0x1000000)
        assert da.init() and db.init()
        da.submit(T_FLUSH)
        signal_eventfd(specs[0].transport.notify_fds[0])
        assert entered.wait(SLOW), "disk a's flush never started"
        # disk a's thread is blocked in its flush; disk b still works
        reqs = [db.submit(T_IN, i, read_len=512) for i in range(4)]
        signal_eventfd(specs[1].transport.notify_fds[0])
        assert len(db.queues[0].wait_used(4, SLOW)) == 4
        assert db.result(reqs[3])[1] == (bytes(range(256)) * 4096)[1536:2048]

        monkeypatch.setattr(machine_mod, "IO_STOP_TIMEOUT", 0.5)
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 60       # bounded: a hung close waits for release (120 s)
        assert m._stuck_io == [specs[0]]
        assert specs[1].transport is None                      # b closed normally
        assert specs[0].transport is not None and m.memory is not None
    finally:
        release.set()
        lib.pv_blk_flush_hook = ffi.NULL
    assert until(lambda: not loops[specs[0]].running)        # its flush returned
    m.close()                                                  # now everything goes
    assert m._stuck_io == [] and specs[0].transport is None and m.memory is None
    serial.close()


def test_stop_is_reentrant_for_signal_handlers(tmp_path):
    """Machine.stop() runs in signal handlers on the main thread, which may
    be inside stop() already (the --timeout path): it must not deadlock, and
    the first reason wins."""
    kernel = T.make_elf(T.CLI_HLT, str(tmp_path / "guest.elf"))
    serial = open(tmp_path / "serial", "wb")
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, serial_out=serial))
    try:
        def interrupted_stop():       # a handler's stop() while stop() holds the lock
            with m._lock:
                m.stop("timeout", "timeout after 1 s")
                m._on_signal(15, None)
        th = threading.Thread(target=interrupted_stop, daemon=True)
        th.start()
        th.join(SLOW)
        assert not th.is_alive(), "stop() deadlocked when re-entered"
        assert m.stop_reason == "timeout" and m.stopping
    finally:
        m.close()
        serial.close()
