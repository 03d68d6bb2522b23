"""Snapshot state without a VM: the state file (round trip, version,
checksum, truncation, architecture), every device's state() -> restore()
round trip through the file encoding, virtio devices continuing on their
rings after a restore (C and Python engines, mmio and legacy PCI), the
pages devices mark for diff snapshots, and the memory file helpers."""
import io
import os

import numpy as np
import pytest

from vmm import snapshot as S
from vmm.hw.i8042 import I8042
from vmm.hw.pvpanic import PvPanic
from vmm.hw.serial import IER, LCR, MCR, RBR_THR, SCR, Serial
from vmm.memory import GuestMemory, GuestMemoryError, MiB
from vmm.testing.mockdriver import T_IN, T_OUT, BlkDriver, MmioRegs, PciLegacyRegs
from vmm.virtio import device as vd
from vmm.virtio.blk import BlkDevice, BlkError
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.pci_legacy import VirtioPciLegacy
from vmm.virtio.queue import QueueState


def through_file(state):
    """What a restore sees: the state after the file encoding."""
    return S.unpack_state(S.pack_state({"arch": S.ARCH, "x": state}))["x"]


# --- the state file ------------------------------------------------------
def test_state_file_round_trip(tmp_path):
    st = {"arch": S.ARCH, "blob": bytes(range(256)), "nested": [{"b": b"\0\1"}, 3, "s", None],
          "flag": True}
    path = tmp_path / "vm.state"
    S.write_state(str(path), st)
    assert S.read_state(str(path)) == st
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]   # no leftovers


def test_header_fields():
    data = S.pack_state({"arch": S.ARCH})
    magic, version, flags, length, _ = S.HEADER.unpack_from(data)
    assert (magic, version, flags, length) == (b"PYVMMSNP", S.VERSION, 0, len(data) - S.HEADER.size)


@pytest.mark.parametrize("mangle,text", [
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-5], "truncated"),
    (lambda d: d + b"x", "truncated or padded"),
    (lambda d: b"NOTASNAP" + d[8:], "not a pyvmm snapshot"),
    (lambda d: d[:8] + (S.VERSION + 1).to_bytes(4, "little") + d[12:], "version"),
    (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "checksum mismatch"),
    (lambda d: b"", "truncated"),
])
def test_bad_state_files_are_refused_in_one_line(mangle, text):
    data = mangle(S.pack_state({"arch": S.ARCH, "vcpus": [], "blob": b"x" * 100}))
    with pytest.raises(S.SnapshotError) as e:
        S.unpack_state(data)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_other_architecture_is_refused():
    with pytest.raises(S.SnapshotError, match="this host is"):
        S.unpack_state(S.pack_state({"arch": "riscv64"}))


def test_load_checks_memory_file_size(tmp_path):
    state, mem = tmp_path / "s", tmp_path / "m"
    S.write_state(str(state), {"arch": S.ARCH, "mem_size": 16 * MiB, "vcpus": [], "vm": {},
                               "devices": [], "legacy": {}, "memory": {"type": "Full"}})
    mem.write_bytes(b"\0" * 4096)
    with pytest.raises(S.SnapshotError, match="4096 bytes, the snapshot's guest has 16777216"):
        S.load(str(state), str(mem))
    with pytest.raises(S.SnapshotError, match="No such file"):
        S.load(str(state), str(tmp_path / "missing"))
    os.truncate(mem, 16 * MiB)
    assert S.load(str(state), str(mem)).state["mem_size"] == 16 * MiB
    with pytest.raises(S.SnapshotError, match="Full snapshot"):
        S.load(str(state), str(mem), mem_diff=str(mem))


# --- legacy devices --------------------------------------------------------
def test_serial_round_trip_and_pending_interrupt_raised_again():
    a = Serial(io.BytesIO())
    a.write(LCR, 1, 0x1B)
    a.write(MCR, 1, 0x0B)
    a.write(SCR, 1, 0x77)
    a.write(IER, 1, 0x01)               # RX interrupt on
    a.receive(b"typed")
    levels = []
    b = Serial(io.BytesIO(), irq=levels.append)
    b.restore(through_file(a.state()))
    assert b.state() == a.state()
    assert levels == [True]             # RX data pending: the line is driven again
    assert bytes(b.read(RBR_THR, 1) for _ in range(5)) == b"typed"


def test_i8042_and_pvpanic_round_trip():
    a = I8042(lambda: None)
    a.write(4, 1, 0xD0)                 # read output port: a byte waits in the buffer
    a.trigger_ctrl_alt_del()            # and keys the guest has not read yet
    raised = []
    b = I8042(lambda: None, irq=lambda: raised.append(1))
    b.restore(through_file(a.state()))
    assert b.state() == a.state() and raised           # pending keys: IRQ 1 again
    assert b.read(4, 1) == a.read(4, 1)
    assert [b.read(0, 1) for _ in range(5)] == [a.read(0, 1) for _ in range(5)]
    p = PvPanic(lambda ev: None)
    p.restore(through_file(p.state()))


# --- virtio ------------------------------------------------------------------
def make_transport(kind, dev, mem):
    if kind == "mmio":
        return VirtioMmio(dev, mem)
    return VirtioPciLegacy(dev, mem)


def rebind(driver, t):
    driver.t = t
    driver.regs = (PciLegacyRegs if isinstance(t, VirtioPciLegacy) else MmioRegs)(t)


@pytest.mark.parametrize("kind", ["mmio", "pci"])
def test_blk_continues_on_its_ring_after_restore(kind, mem, image, native):
    dev = BlkDevice(image, native=native)
    t = make_transport(kind, dev, mem)
    d = BlkDriver(t, mem)
    assert d.init()
    for i in range(5):                  # move the ring indices along
        assert d.run(T_OUT, sector=i, data=bytes([i]) * 512)[0] == 0
    pending = d.submit(T_IN, sector=3, read_len=512)   # queued, not yet kicked
    st = through_file(t.state())
    assert st["queues"][0]["next_avail"] == 5 and st["queues"][0]["next_used"] == 5
    t.close()                           # the old process is gone; the image stays

    dev2 = BlkDevice(image, native=native)
    t2 = make_transport(kind, dev2, mem)
    t2.restore(st)
    rebind(d, t2)
    assert t2.activated and t2.status == st["status"]
    assert dev2.acked_features == st["device"]["acked_features"]
    t2.restart()                        # looks at the queue: the pending request completes
    used = dict(d.queues[0].get_used())
    assert pending.head in used and d.result(pending) == (0, bytes([3]) * 512)
    assert d.run(T_IN, sector=4, read_len=512)[:2] == (0, bytes([4]) * 512)
    assert t2.state()["queues"][0]["next_used"] == 7
    t2.close()


def test_pci_config_space_and_bar_survive(mem, image):
    t = VirtioPciLegacy(BlkDevice(image), mem)
    t.pci.program_bar(0, 0xC040)
    t.pci.write_config(4, 2, 1)         # I/O decoding on
    d = BlkDriver(t, mem)
    assert d.init()
    st = through_file(t.state())
    t.close()
    t2 = VirtioPciLegacy(BlkDevice(image), mem)
    moved = []
    t2.pci.on_map = lambda dev, bar, old, new: moved.append((old, new)) or new
    t2.restore(st)
    assert bytes(t2.pci.config) == bytes(t.pci.config)
    assert t2.pci.bar_address(0) == 0xC040 and moved == [(None, 0xC040)]
    t2.close()


def test_interrupt_pending_at_snapshot_is_raised_again(mem, image):
    raised = []
    t = VirtioMmio(BlkDevice(image), mem, irq=lambda: raised.append(1))
    d = BlkDriver(t, mem)
    assert d.init()
    d.run(T_IN, sector=0, read_len=512)     # used buffer: ISR bit set, not acked
    st = through_file(t.state())
    assert st["interrupt_status"] & vd.INT_USED
    t.close()
    again = []
    t2 = VirtioMmio(BlkDevice(image), mem, irq=lambda: again.append(1))
    t2.restore(st)
    t2.restart()
    assert again and t2.interrupt_status & vd.INT_USED
    t2.close()


def test_restore_refuses_another_disk_size(mem, image, tmp_path):
    t = VirtioMmio(BlkDevice(image), mem)
    assert BlkDriver(t, mem).init()
    st = through_file(t.state())
    t.close()
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * (2 * MiB))
    t2 = VirtioMmio(BlkDevice(str(other)), mem)
    with pytest.raises(BlkError, match="sectors, the snapshot's disk had"):
        t2.restore(st)
    t2.close()


def test_device_without_rings_cannot_be_snapshotted(mem):
    class Plain(vd.VirtioDevice):
        device_type = 4
        queue_max_sizes = (8,)

        def activate(self, mem, queues, interrupt):
            pass

    t = VirtioMmio(Plain(), mem)
    t.activated = True
    with pytest.raises(NotImplementedError, match="does not support snapshots"):
        t.state()


def test_queue_state_round_trip():
    qs = QueueState(256, True, 0x1000, 0x2000, 0x3000, 7, 6, 5, True)
    assert QueueState.from_dict(through_file(qs.to_dict())) == qs
    with pytest.raises(ValueError, match="lacks"):
        QueueState.from_dict({"size": 1})


# --- dirty pages and memory files ------------------------------------------
def test_devices_mark_the_pages_they_write(mem, image, native):
    mem.track_device_writes(True)
    t = VirtioMmio(BlkDevice(image, native=native), mem)
    d = BlkDriver(t, mem)
    assert d.init()
    mem.take_device_dirty()
    req = d.submit(T_IN, sector=0, read_len=3 * 4096)
    d.kick()
    dirty = set(np.flatnonzero(mem.take_device_dirty()))
    want = {gpa // 4096 for gpa, n in req.data for gpa in range(gpa, gpa + n, 512)}
    want |= {req.status // 4096, d.queues[0].used // 4096}
    assert want <= dirty
    assert not mem.take_device_dirty().any()      # taking clears
    t.close()


def test_memory_file_sparse_round_trip(tmp_path):
    m = GuestMemory(16 * MiB)
    try:
        m.write(0x5000, b"hello")
        m.write(16 * MiB - 4096, b"end")
        path = tmp_path / "vm.mem"
        runs = S.write_memory(m, str(path), m.pages_in_use())
        assert runs == [(5, 1), (4095, 1)]
        assert path.stat().st_size == 16 * MiB
        assert path.stat().st_blocks * 512 < 1 * MiB       # sparse
        r = GuestMemory(16 * MiB, backing=str(path))
        try:
            assert r.read(0x5000, 5) == b"hello" and r.read(16 * MiB - 4096, 3) == b"end"
            r.write(0x5000, b"HELLO")                      # private: the file keeps its bytes
        finally:
            r.close()
        with open(path, "rb") as f:
            f.seek(0x5000)
            assert f.read(5) == b"hello"
    finally:
        m.close()


def test_diff_applied_over_base(tmp_path):
    m = GuestMemory(16 * MiB)
    try:
        m.write(0x1000, b"base")
        S.write_memory(m, str(tmp_path / "base"), m.pages_in_use())
        m.write(0x1000, b"diff")
        m.write(0x9000, b"new")
        mask = np.zeros(m.size // 4096, dtype=bool)
        mask[[1, 9]] = True
        runs = S.write_memory(m, str(tmp_path / "diff"), mask)
        r = GuestMemory(16 * MiB, backing=str(tmp_path / "base"))
        try:
            S.apply_diff(r, str(tmp_path / "diff"), runs)
            assert r.read(0x1000, 4) == b"diff" and r.read(0x9000, 3) == b"new"
        finally:
            r.close()
    finally:
        m.close()


def diff_layer(m, tmp_path, name, pages):
    """A Diff snapshot of `m`'s `pages`: (state file, memory file)."""
    mask = np.zeros(m.size // 4096, dtype=bool)
    mask[pages] = True
    runs = S.write_memory(m, str(tmp_path / f"{name}.mem"), mask)
    S.write_state(str(tmp_path / f"{name}.state"), {"arch": S.ARCH, "mem_size": m.size,
                                                    "memory": {"type": "Diff", "runs": runs}})
    return str(tmp_path / f"{name}.state"), str(tmp_path / f"{name}.mem")


def test_two_diff_layers_rebased_give_the_last_memory(tmp_path):
    """base + diff1 + diff2: diff1 rebased onto the base, then diff2 applied
    as at restore, is byte for byte the memory at diff2's time; diff2 over
    the bare base is not (diff1's pages are missing)."""
    m = GuestMemory(16 * MiB)
    try:
        m.write(0x1000, b"base-1")
        m.write(0x2000, b"base-2")
        m.write(0x7000, b"base-7")
        S.write_memory(m, str(tmp_path / "base.mem"), m.pages_in_use())
        m.write(0x2000, b"diff1-2")             # only diff1 has these two pages
        m.write(0x3000, b"diff1-3")
        m.write(0x7000, bytes(6))               # a page zeroed again: must win over the base
        d1 = diff_layer(m, tmp_path, "d1", [2, 3, 7])
        m.write(0x1000, b"diff2-1")
        d2 = diff_layer(m, tmp_path, "d2", [1])
        want = bytes(m.array)
    finally:
        m.close()
    base = str(tmp_path / "base.mem")
    merged = str(tmp_path / "merged.mem")
    assert S.rebase(base, *d1, out_path=merged) == 3
    runs2 = S.read_state(d2[0])["memory"]["runs"]
    for backing, same in ((merged, True), (base, False)):
        r = GuestMemory(16 * MiB, backing=backing)
        try:
            S.apply_diff(r, d2[1], runs2)
            assert (bytes(r.array) == want) is same
        finally:
            r.close()
    assert os.path.getsize(merged) == 16 * MiB and os.stat(merged).st_blocks * 512 < MiB
    before = open(base, "rb").read()
    S.rebase(base, *d1)                         # in place: a new inode replaces the base
    assert open(base, "rb").read() == open(merged, "rb").read() != before


def test_rebase_refuses_bad_layers(tmp_path):
    m = GuestMemory(16 * MiB)
    try:
        S.write_memory(m, str(tmp_path / "base.mem"), m.pages_in_use())
        d1 = diff_layer(m, tmp_path, "d1", [1])
    finally:
        m.close()
    base = str(tmp_path / "base.mem")
    (tmp_path / "short.mem").write_bytes(bytes(4096))
    S.write_state(str(tmp_path / "full.state"), {"arch": S.ARCH, "mem_size": 16 * MiB,
                                                 "memory": {"type": "Full", "runs": None}})
    for args, text in (((str(tmp_path / "short.mem"), *d1), "4096 bytes"),
                       ((base, d1[0], str(tmp_path / "short.mem")), "4096 bytes"),
                       ((base, str(tmp_path / "full.state"), d1[1]), "not a Diff snapshot"),
                       ((base, d1[0], str(tmp_path / "nope")), "No such file")):
        with pytest.raises(S.SnapshotError, match=text) as e:
            S.rebase(*args, out_path=str(tmp_path / "out.mem"))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out.mem").exists()


def test_wrong_size_memory_file_is_refused(tmp_path):
    path = tmp_path / "short.mem"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(GuestMemoryError, match="4096 bytes"):
        GuestMemory(16 * MiB, backing=str(path))


# --- device options on restore ---------------------------------------------------
def test_device_options_and_overrides(tmp_path):
    from vmm.devices import DeviceSpecError, DriveSpec, spec_from_options
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"\0" * 4096)
    b.write_bytes(b"\0" * 4096)
    opts = DriveSpec(f"file={a},readonly=on,serial=abc,transport=pci-legacy").snapshot_options()
    opts = through_file(opts)
    same = spec_from_options(opts)
    assert (same.path, same.readonly, same.serial, same.transport_name) == (
        str(a), True, "abc", "pci-legacy")
    other = spec_from_options(opts, f"file={b}")
    assert other.path == str(b) and other.transport_name == "pci-legacy" and other.readonly
    with pytest.raises(DeviceSpecError, match="transport cannot change"):
        spec_from_options(opts, f"file={b},transport=mmio")
    with pytest.raises(DeviceSpecError, match="no such file"):
        spec_from_options(opts, f"file={tmp_path / 'missing.img'}")
    with pytest.raises(DeviceSpecError, match="unknown kind"):
        spec_from_options({"kind": "floppy"})


def test_rng_continues_on_its_ring_after_restore(mem):
    from vmm.testing.mockdriver import MockDriver
    from vmm.virtio.rng import RngDevice
    t = VirtioMmio(RngDevice(), mem)
    d = MockDriver(t, mem)
    assert d.init()
    for _ in range(3):
        buf = d.alloc(64)
        d.queues[0].add([(buf, 64, True)])
        d.kick(0)
        assert [n for _, n in d.queues[0].get_used()] == [64]
    st = through_file(t.state())
    assert st["queues"][0]["next_avail"] == 3
    t.close()
    t2 = VirtioMmio(RngDevice(), mem)
    t2.restore(st)
    rebind(d, t2)
    buf = d.alloc(64)
    head = d.queues[0].add([(buf, 64, True)])
    d.kick(0)
    assert dict(d.queues[0].get_used()) == {head: 64}
    t2.close()
