"""What the Python fuzz targets share: a byte reader over the fuzz input,
guest memory and a disk image reused across inputs, a socketpair standing
in for a tap, and `drive()`, which turns the input into a sequence of guest
actions against one virtio transport and checks invariants after each.

A target is one small module in this directory with a docstring and

    def one_input(data: bytes) -> None

that raises on a crash: any exception other than those the action
documents (the mock driver's DriverError when the fuzzed guest is not a
well-behaved driver), an error logged by the VMM (`log.exception` means a
Python bug was caught at the device boundary), or a broken invariant
(`Broken`).  Hangs are caught by the runner's per-input timeout.
fuzz/run.py runs every module here under atheris; tests/fuzz/ replays the
corpora and kept crash inputs through `one_input` without atheris.
"""
import logging
import os
import tempfile

from vmm.memory import GuestMemory, MiB
from vmm.pci import bus as pci_bus
from vmm.pci import device as pd
from vmm.testing.mockdriver import (BlkDriver, DriverError, DriverQueue, MmioRegs, MockDriver,
                                    PciLegacyRegs)
from vmm.testing.mocknet import NetDriver
from vmm.testing.sockbackend import SockBackend
from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio import pci_legacy as pl
from vmm.bus import Bus

IMAGE_SIZE = 64 * 1024
ARENA, ARENA_SIZE = 0x10000, 1 << 20


class Broken(AssertionError):
    """An invariant the VMM must keep whatever the guest does."""


def check(cond, what):
    if not cond:
        raise Broken(what)


class Provider:
    """Reads little-endian integers off the front of the input (zeros once
    it runs out: `left` tells when to stop)."""

    def __init__(self, data):
        self.data, self.pos = bytes(data), 0

    @property
    def left(self):
        return self.pos < len(self.data)

    def int(self, nbytes):
        b = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(b, "little")

    def byte(self):
        return self.int(1)

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def bytes(self, n):
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


# --- VMM errors logged at the device boundary are crashes ---
class _ErrorTrap(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


_trap = _ErrorTrap()
_vmm_log = logging.getLogger("pyvmm")
_vmm_log.addHandler(_trap)
_vmm_log.setLevel(logging.ERROR)     # warnings about guest misbehaviour: expected, quiet
_vmm_log.propagate = False


def forget_errors():
    """Drop what was logged before this input (the replay tests share their
    process with other tests, whose expected errors must not count here)."""
    _trap.records.clear()


def check_no_errors():
    if _trap.records:
        r = _trap.records[0]
        _trap.records.clear()
        msg = r.getMessage()
        if r.exc_info:
            raise Broken(f"VMM logged an error: {msg}") from r.exc_info[1]
        raise Broken(f"VMM logged an error: {msg}")


# --- resources reused across inputs (an input must not depend on the last) ---
_mem = None
_image = None


def guest_memory():
    global _mem
    if _mem is None:
        _mem = GuestMemory(16 * MiB)
    _mem.view(0, ARENA + ARENA_SIZE)[:] = 0
    return _mem


def scratch_path(kind):
    """A per-process scratch path, pyvmm-fuzz-<kind>-<pid>, on tmpfs when
    there is one.  libFuzzer ends the process with _exit (no atexit), so
    the ones of processes that are gone are removed here instead."""
    import glob
    import shutil
    d = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for old in glob.glob(os.path.join(d, f"pyvmm-fuzz-{kind}-*")):
        pid = old.rsplit("-", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(old, True) if os.path.isdir(old) else os.unlink(old)
    return os.path.join(d, f"pyvmm-fuzz-{kind}-{os.getpid()}")


def disk_image():
    """A 64 KiB image on tmpfs when there is one, rewritten for each input."""
    global _image
    if _image is None:
        _image = scratch_path("img")
    with open(_image, "wb") as f:
        f.write(bytes(range(256)) * (IMAGE_SIZE // 256))
    return _image


class LegacyMmioRegs(MmioRegs):
    """Legacy virtio-mmio (version 1, §4.2.4) for the mock driver: no
    FEATURES_OK, GuestPageSize, rings at QueuePFN with QueueAlign."""
    features_ok = False
    PAGE = 4096

    def check(self):
        if self.rd(m.MAGIC_VALUE) != m.MAGIC or self.rd(m.VERSION) != 1:
            raise DriverError("not a legacy virtio-mmio device")

    def setup_queues(self, drv, queue_sizes):
        self.wr(m.GUEST_PAGE_SIZE, self.PAGE)
        queues = []
        for i in range(len(self.t.queues)):
            self.wr(m.QUEUE_SEL, i)
            if self.rd(m.QUEUE_PFN):
                raise DriverError(f"queue {i} already live")
            qmax = self.rd(m.QUEUE_NUM_MAX)
            size = min(qmax, queue_sizes[i]) if queue_sizes else qmax
            q = DriverQueue(drv, i, size, legacy_align=self.PAGE)
            self.wr(m.QUEUE_NUM, size)
            self.wr(m.QUEUE_ALIGN, self.PAGE)
            self.wr(m.QUEUE_PFN, q.desc // self.PAGE)
            queues.append(q)
        return queues


# --- one fuzzed guest against one transport ---
class Guest:
    """The device under test, its transport, a mock driver to take the
    well-formed paths, and how the fuzzed guest reaches the registers."""

    def __init__(self, p, transport_kind, device_kind):
        from vmm.virtio.blk import BlkDevice
        from vmm.virtio.net import NetDevice
        self.mem = guest_memory()
        self.kind = device_kind
        self.backend = None
        self.image = None
        qsize = p.pick((256, 8, 4, 1024 if device_kind == "blk" else 512))
        self.uds_dir = None
        if device_kind == "blk":
            self.image = disk_image()
            self.dev = BlkDevice(self.image, readonly=p.byte() & 1, serial=b"fuzz",
                                 native=bool(p.byte() & 1), queue_size=qsize)
        elif device_kind in ("net", "netmq"):
            pairs = 2 if device_kind == "netmq" else 1
            self.backend = SockBackend(pairs, bufsize=0, name="fuzz")
            self.dev = NetDevice(self.backend, mrg_rxbuf=bool(p.byte() & 1), queue_size=qsize,
                                 queue_pairs=pairs)
        elif device_kind == "vsock":
            from vmm.virtio.vsock import VsockDevice
            self.uds_dir = tempfile.mkdtemp(prefix="pyvmm-fuzz-vsock-")
            self.dev = VsockDevice(os.path.join(self.uds_dir, "v.sock"), queue_size=qsize)
        else:
            from vmm.virtio.rng import RngDevice
            self.dev = RngDevice(queue_size=qsize)
        try:
            self._build(p, transport_kind, device_kind)
        except BaseException:
            self.dev.close()
            if self.backend is not None:
                self.backend.close()
            self._rm_uds()
            raise

    def _build(self, p, transport_kind, device_kind):
        from vmm.virtio.mmio import VirtioMmio
        from vmm.virtio.pci_legacy import VirtioPciLegacy
        self.pci = None
        self.bar = 0
        if transport_kind.startswith("pci"):
            self.pio, self.mmio = Bus("pio"), Bus("mmio")
            self.pci = pci_bus.PciBus(self.pio, self.mmio)
            self.pio.register(pci_bus.CONFIG_ADDRESS, pci_bus.PORTS, self.pci)
            if transport_kind == "pci":
                self.t = VirtioPciLegacy(self.dev, self.mem, irq_line=lambda level: None)
                self.window = pl.region_size(len(self.dev.config_bytes()))
            else:                       # modern (MSI-X through a FakeVm's routing table)
                from vmm.testing.fakevm import FakeVm
                from vmm.virtio import pci_modern as pm
                self.t = pm.VirtioPciModern(self.dev, self.mem, vm=FakeVm(),
                                            irq_line=lambda level: None)
                self.bar, self.window = pm.BAR_MODERN, pm.BAR_SIZE
            self.slot = self.pci.add(self.t.pci, irq=5)
        else:
            self.t = VirtioMmio(self.dev, self.mem, irq=lambda: None,
                                legacy=transport_kind == "mmio-legacy")
            self.window = m.VirtioMmio.WINDOW
        drv = {"blk": BlkDriver, "net": NetDriver, "netmq": NetDriver}.get(device_kind, MockDriver)
        kw = {}
        if device_kind == "vsock":
            from vmm.testing.mockvsock import VsockDriver
            drv, kw = VsockDriver, dict(rx_buffers=8)
        if transport_kind == "pci-modern":
            from vmm.testing.pcimodern_regs import PciModernRegs
            msix = bool(p.byte() & 1)
            regs = lambda t: PciModernRegs(t, msix=msix)      # noqa: E731
        else:
            regs = {"pci": PciLegacyRegs, "mmio-legacy": LegacyMmioRegs}.get(transport_kind,
                                                                          MmioRegs)
        self.d = drv(self.t, self.mem, arena=ARENA, arena_size=ARENA_SIZE, regs=regs, **kw)
        self.tainted = False          # the guest scribbled on its rings: guards may go
        self.ready = False

    # register access as the guest does it: PCI through BAR0 where it decodes now
    def bar_base(self):
        bar = self.t.pci.bars[self.bar]
        return bar.mapped, (self.pio if bar.io else self.mmio)

    def reg_read(self, off, size):
        if self.pci is not None:
            base, bus = self.bar_base()
            if base is None:
                return (1 << (8 * size)) - 1            # nothing decodes there: all ones
            return bus.read(base + off, size)
        return self.t.read(off, size)

    def reg_write(self, off, size, value):
        if self.pci is not None:
            base, bus = self.bar_base()
            if base is not None:
                bus.write(base + off, size, value)
            return
        self.t.write(off, size, value)

    def _rm_uds(self):
        if self.uds_dir is not None:
            import shutil
            shutil.rmtree(self.uds_dir, True)
            self.uds_dir = None

    def close(self):
        self.t.close()
        if self.backend is not None:
            self.backend.close()
        self._rm_uds()

    # invariants after every step
    def check(self):
        check_no_errors()
        t = self.t
        check(0 <= t.status <= 0xFF, f"status {t.status}")
        check(t.interrupt_status & ~(vd.INT_USED | vd.INT_CONFIG) == 0,
              f"ISR {t.interrupt_status:#x}")
        reason = t.needs_reset_reason or ""
        check("internal error" not in reason, f"device raised: {reason}")
        if self.pci is None:
            check(t.read(m.MAGIC_VALUE, 4) == m.MAGIC, "magic")
        else:
            check(self.t.pci.get(pd.VENDOR_ID, 2) == pl.VENDOR, "vendor ID")
            check(self.t.pci.get(pd.HEADER_TYPE, 1) == 0, "header type")
        if self.image is not None:
            check(os.path.getsize(self.image) == IMAGE_SIZE, "image size changed")
        if not self.tainted:
            bad = self.d.check_guards()
            check(not bad, f"device wrote guard bytes at {[hex(g) for g in bad]}")


def _collect(q):
    """The mock driver takes its completions, unless the ring was scribbled
    into claiming more than a ring's worth (it would walk 64K entries)."""
    if (q.used_idx - q.last_used) & 0xFFFF <= q.size:
        q.get_used()


def _driver_request(g, p):
    """A well-formed request through the mock driver (the queue paths)."""
    if not g.d.queues:
        return
    if g.kind == "blk":
        typ = p.pick((0, 1, 4, 8, 11, 13, 0, 1, 99))
        sector = p.pick((0, 1, 127, 128, 2 ** 63, 2 ** 64 - 1))
        if typ in (11, 13):
            segs = b"".join(p.int(8).to_bytes(8, "little") + p.pick((0, 1, 8, 0xFFFFFFFF))
                            .to_bytes(4, "little") + p.pick((0, 1, 2)).to_bytes(4, "little")
                            for _ in range(1 + p.byte() % 3))
            g.d.submit(typ, sector, data=segs, indirect=bool(p.byte() & 1))
        elif typ == 1:
            g.d.submit(typ, sector, data=b"\x5a" * p.pick((512, 1024, 100)),
                       split=1 + p.byte() % 4, indirect=bool(p.byte() & 1))
        else:
            g.d.submit(typ, sector, read_len=p.pick((512, 20, 0, 1024, 7)),
                       split=1 + p.byte() % 4, indirect=bool(p.byte() & 1))
        g.d.kick()
        _collect(g.d.queues[0])
    elif g.kind == "vsock":
        from vmm.testing import mockvsock as mv
        op = p.pick((mv.OP_REQUEST, mv.OP_RW, mv.OP_RST, mv.OP_SHUTDOWN, mv.OP_CREDIT_UPDATE,
                     mv.OP_CREDIT_REQUEST, mv.OP_RESPONSE, 0, 99))
        data = p.bytes(p.pick((0, 16, 100))) if op == mv.OP_RW else b""
        g.d.packet(p.pick((1025, 1026, 5)), p.pick((52, 1024, 0xFFFFFFFF)), op, data,
                   flags=p.byte() & 3, buf_alloc=p.pick((65536, 0, 1 << 31)), fwd_cnt=p.int(4),
                   src_cid=p.pick((None, None, 2, 7)), length=p.pick((None, None, 0xFFFFFFFF)))
        g.dev.poll()
        _collect(g.d.queues[0])
        _collect(g.d.queues[1])
    elif g.kind == "rng":
        q = g.d.queues[0]
        n = p.pick((64, 1, 4096, 0))
        q.add([(g.d.alloc(max(n, 1), 16, 16), n, True)], indirect=bool(p.byte() & 1))
        g.d.kick(0)
        _collect(q)
    elif g.kind == "netmq" and p.byte() & 1 and len(g.d.queues) > 4:
        q = g.d.queues[4]                               # the control queue (§5.1.6.5)
        cmd = bytes([p.pick((4, 0, 1, 9)), p.byte() % 3]) + p.bytes(p.pick((2, 1, 6, 20, 0)))
        gpa = g.d.alloc(len(cmd), 16, 16)
        g.mem.write(gpa, cmd)
        ack = g.d.alloc(1, 1, 16, fill=0xFF)
        q.add([(gpa, len(cmd), False), (ack, p.pick((1, 1, 0)), True)],
              indirect=bool(p.byte() & 1))
        g.d.kick(4)
        _collect(q)
    else:
        if p.byte() & 1:
            g.d.add_rx(p.pick((1526, 64, 12, 4000)), split=1 + p.byte() % 3,
                       indirect=bool(p.byte() & 1))
            g.d.kick(0)
            g.backend.peer.send(bytes(12) + b"\x77" * p.pick((60, 1514, 3000, 0)))
            g.dev.poll_rx()
            _collect(g.d.queues[0])
        else:
            g.d.send(b"\x66" * p.pick((60, 1514, 0)), split=1 + p.byte() % 3,
                     indirect=bool(p.byte() & 1))
            g.backend.drain_peer()
            _collect(g.d.queues[1])


def _scribble(g, p):
    """The guest rewrites its own rings or descriptors (a hostile driver)."""
    if not g.d.queues:
        return
    q = g.d.queues[p.byte() % len(g.d.queues)]
    area = p.pick(((q.desc, 16 * q.size), (q.avail, 6 + 2 * q.size), (q.used, 6 + 8 * q.size)))
    off = p.int(2) % area[1]
    data = p.bytes(p.pick((1, 2, 4, 8, 16)))
    g.mem.write(area[0] + off, data[:area[1] - off])
    g.tainted = True
    g.d.kick(q.index)


def _pci_config(g, p):
    """Configuration mechanism #1 (0xCF8/0xCFC) as the guest uses it."""
    slot = p.pick((g.slot, g.slot, 0, 7))
    reg = p.byte() & 0xFC
    g.pio.write(pci_bus.CONFIG_ADDRESS, 4, pci_bus.ENABLE | slot << 11 | reg | p.pick((0, 0, 1 << 16, 1 << 8)))
    size = p.pick((1, 2, 4))
    port = pci_bus.CONFIG_DATA + p.byte() % 4
    if p.byte() & 1:
        v = g.pio.read(port, size)
        check(0 <= v < 1 << (8 * size), f"config read {v:#x}")
    else:
        g.pio.write(port, size, p.int(4) & ((1 << (8 * size)) - 1))


def drive(data, transport_kind, device_kind, max_steps=64):
    """The whole fuzzed guest: build, run up to `max_steps` actions, check
    invariants after each, close."""
    p = Provider(data)
    g = Guest(p, transport_kind, device_kind)
    try:
        g.check()
        for _ in range(max_steps):
            if not p.left:
                break
            op = p.byte() % 10
            if op in (0, 1):                            # raw register write
                off = p.int(2) % (g.window + 8)
                size = p.pick((4, 1, 2, 8))
                # a guest access carries `size` bytes (KVM's exit data): the bus contract
                g.reg_write(off, size, p.int(8) & ((1 << (8 * size)) - 1))
                g.tainted = True        # rings may now be anywhere, over the driver's guards
            elif op == 2:                               # raw register read
                size = p.pick((4, 1, 2, 8))
                v = g.reg_read(p.int(2) % (g.window + 8), size)
                check(isinstance(v, int) and 0 <= v < 1 << (8 * size), f"read {v!r}")
            elif op == 3:                               # a driver brings the device up
                try:
                    g.d._next, g.d.guards = ARENA, []    # forget every buffer
                    g.d.queues = []     # (a refused init leaves none)
                    g.tainted = False
                    g.d.init(features=p.int(8) | p.pick((0, 1 << 32, -1)) & (2 ** 64 - 1),
                             queue_sizes=[p.pick((256, 1, 8))] * len(g.t.queues))
                except DriverError:
                    pass
            elif op in (4, 5):
                try:
                    _driver_request(g, p)
                except DriverError:
                    pass
            elif op == 6:
                _scribble(g, p)
            elif op == 7:                               # a bare queue notification
                g.t.notify(p.int(2) % 4)
            elif op == 8 and g.pci is not None:
                _pci_config(g, p)
            else:                                       # status write (0: reset)
                bits = p.pick((0, vd.ACKNOWLEDGE, vd.DRIVER, vd.FEATURES_OK, vd.DRIVER_OK,
                               0xFF, p.byte()))
                g.d.regs.write_status(bits | (g.d.regs.status() if p.byte() & 1 else 0))
            g.check()
    finally:
        g.close()
    check_no_errors()
