"""Configuration space of one PCI function with a type 0 header (PCI Local
Bus Specification 3.0, chapter 6).

The 256 bytes live in `config`; `wmask` marks the bits software may write
and `w1cmask` the status bits it clears by writing 1 (§6.2.3), so any byte,
word or dword access at any offset is a loop over bytes.  BARs (§6.2.5.1)
are ordinary registers whose writable bits are the address bits above the
region size: writing all ones and reading back gives the size mask.  After a
write to the command register or a BAR the function works out which BARs now
decode where and tells its bus through `on_map(device, bar, old, new)`.

INTx (§2.2.6, §6.2.4): a device calls `set_intx(level)`; the line reaches
`irq_line(level)` unless Interrupt Disable (command bit 10) is set, and
status bit 3 shows the device's own state either way.

A 64-bit memory BAR (§6.2.5.1, type 10b) takes two BAR registers, the
second holding the upper address bits.  `watch_config(start, length, fn)`
calls fn() after a guest write touching that range (MSI-X Message Control),
and `config_window(start, length, read, write)` hands a range's accesses to
the owner (the virtio PCI-config-access capability's data bytes).
"""
import threading

# §6.1 type 0 header offsets
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, CLASS_DEVICE = 0x08, 0x09, 0x0A
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE, BIST = 0x0C, 0x0D, 0x0E, 0x0F
BAR0, BAR_COUNT = 0x10, 6
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
ROM_ADDRESS, CAPABILITY_LIST = 0x30, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
CAP_START = 0x40                        # first byte after the predefined header

# §6.2.2 command and §6.2.3 status bits
CMD_IO, CMD_MEMORY, CMD_MASTER = 0x1, 0x2, 0x4
CMD_PARITY, CMD_SERR, CMD_INTX_DISABLE = 0x40, 0x100, 0x400
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x08, 0x10
STATUS_W1C = 0xF900                     # parity/abort/SERR error bits: write 1 to clear

# §6.2.5.1 BAR low bits
BAR_IO = 0x1
BAR_MEM_64 = 0x4                        # type 10b: 64-bit, two registers
BAR_IO_MASK, BAR_MEM_MASK = 0xFFFFFFFC, 0xFFFFFFF0
IO_SPACE_END = 0x10000                  # x86 port space: 16 address bits decoded
MEM_SPACE_END = 1 << 32                 # 32-bit memory BARs
MEM64_SPACE_END = 1 << 46               # 64-bit BARs: below the guest's physical address width

HEADER_TYPE_NORMAL = 0x00
PIN_INTA = 1


class Bar:
    __slots__ = ("index", "size", "io", "handler", "mapped", "is64")

    def __init__(self, index, size, io, handler, is64=False):
        self.index, self.size, self.io, self.handler = index, size, io, handler
        self.is64 = is64
        self.mapped = None              # address the bus decodes it at, or None

    @property
    def offset(self):
        return BAR0 + 4 * self.index


class PciDevice:
    """One function: header fields, BARs, capabilities and INTx state."""

    def __init__(self, vendor, device, class_code, revision=0, subsystem_vendor=0,
                 subsystem=0, irq_pin=0, irq_line=None, name="pci"):
        self.name = name
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.w1cmask = bytearray(256)
        self.bars = {}
        self.on_map = None              # set by the bus: (device, bar, old, new)
        self.irq_line = irq_line        # callable(level) for the INTx line
        self._intx = 0
        self._line = 0
        self._intx_lock = threading.Lock()
        # callable() -> the device's interrupt request, when something other
        # than set_intx() raises it (an irqfd written from C): status bit 3
        # is refreshed from it on reads
        self.intx_status = None
        self._last_cap = CAPABILITY_LIST
        self._watches = []              # (start, end, fn) called after guest writes
        self._windows = []              # (start, end, read, write) owned by the device
        self._cap_end = CAP_START
        self.set(VENDOR_ID, 2, vendor)
        self.set(DEVICE_ID, 2, device)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_PROG, 3, class_code)
        self.set(HEADER_TYPE, 1, HEADER_TYPE_NORMAL)
        self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self.set(SUBSYSTEM_ID, 2, subsystem)
        self.set(INTERRUPT_PIN, 1, irq_pin)
        self.set(COMMAND, 2, 0, wmask=CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_PARITY | CMD_SERR
                 | (CMD_INTX_DISABLE if irq_pin else 0))
        self.set(STATUS, 2, 0, w1c=STATUS_W1C)
        self.set(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self.set(LATENCY_TIMER, 1, 0, wmask=0xFF)
        self.set(INTERRUPT_LINE, 1, 0xFF, wmask=0xFF)   # 0xFF: "unknown" until assigned

    # --- building the header (VMM side) ---
    def set(self, offset, size, value, wmask=0, w1c=0):
        """Set a field and which of its bits the guest may write / clear."""
        self.config[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")

    def get(self, offset, size):
        return int.from_bytes(self.config[offset:offset + size], "little")

    def add_bar(self, index, size, handler, io=True, is64=False):
        """A BAR of `size` bytes (a power of two; I/O: 4..256 bytes as
        §6.2.5.1 allows; memory: at least 16) whose accesses go to `handler`
        (read(offset, size) / write(offset, size, value)).  A 64-bit memory
        BAR also takes register index + 1 (upper address bits)."""
        taken = [i for b in self.bars.values() for i in ((b.index, b.index + 1) if b.is64 else (b.index,))]
        last = index + (1 if is64 else 0)
        if not 0 <= index or last >= BAR_COUNT or index in taken or last in taken or (is64 and io):
            raise ValueError(f"BAR{index} invalid or already present")
        if size & (size - 1) or not (4 <= size <= 256 if io else size >= 16):
            raise ValueError(f"bad {'I/O' if io else 'memory'} BAR size {size}")
        bar = self.bars[index] = Bar(index, size, io, handler, is64)
        if io:   # upper 16 bits hardwired to 0: the device decodes 16-bit ports
            self.set(bar.offset, 4, BAR_IO, wmask=~(size - 1) & BAR_IO_MASK & (IO_SPACE_END - 1))
        elif is64:
            self.set(bar.offset, 4, BAR_MEM_64, wmask=~(size - 1) & BAR_MEM_MASK)
            self.set(bar.offset + 4, 4, 0, wmask=0xFFFFFFFF)
        else:
            self.set(bar.offset, 4, 0, wmask=~(size - 1) & BAR_MEM_MASK)
        return bar

    def watch_config(self, start, length, fn):
        """Call fn() after every guest write that touches [start, start+length)."""
        self._watches.append((start, start + length, fn))

    def config_window(self, start, length, read, write):
        """Guest accesses within [start, start+length) go to read(offset,
        size) / write(offset, size, value) (offset relative to start); an
        access running across the window's edge is ignored (reads ones)."""
        self._windows.append((start, start + length, read, write))

    def _window(self, offset, size):
        for start, end, read, write in self._windows:
            if offset < end and offset + size > start:
                return start, end, read, write
        return None

    def add_capability(self, cap_id, body=b"", wmask=b""):
        """Append a capability (§6.7): ID, next pointer, then `body`.
        Returns its offset; sets the Capabilities List status bit."""
        off = self._cap_end
        size = (2 + len(body) + 3) & ~3
        if off + size > 256:
            raise ValueError("capability list full")
        self.config[off] = cap_id
        self.config[off + 2:off + 2 + len(body)] = body
        self.wmask[off + 2:off + 2 + len(wmask)] = wmask
        self.config[self._last_cap] = off            # previous next pointer
        self._last_cap = off + 1
        self._cap_end = off + size
        self.config[STATUS] |= STATUS_CAP_LIST
        return off

    def program_bar(self, index, address):
        """Firmware-style assignment of a BAR address (no decode change)."""
        bar = self.bars[index]
        low = BAR_IO if bar.io else (BAR_MEM_64 if bar.is64 else 0)
        self.config[bar.offset:bar.offset + 4] = ((address & 0xFFFFFFFF) | low).to_bytes(4, "little")
        if bar.is64:
            self.config[bar.offset + 4:bar.offset + 8] = (address >> 32).to_bytes(4, "little")
        self._update_mappings()

    # --- configuration accesses (guest side) ---
    def read_config(self, offset, size):
        """Little-endian value of `size` bytes at `offset`; bytes past the
        256-byte space read as ones."""
        if self._windows:
            w = self._window(offset, size)
            if w is not None:
                start, end, read, _ = w
                if offset < start or offset + size > end:
                    return (1 << (8 * size)) - 1
                return read(offset - start, size) & ((1 << (8 * size)) - 1)
        if self.intx_status is not None and offset <= STATUS < offset + size:
            level = self.intx_status()
            with self._intx_lock:
                st = self.config[STATUS]
                self.config[STATUS] = (st | STATUS_INTERRUPT) if level else (st & ~STATUS_INTERRUPT)
        data = self.config[offset:offset + size]
        return int.from_bytes(bytes(data) + b"\xff" * (size - len(data)), "little")

    def write_config(self, offset, size, value):
        if self._windows:
            w = self._window(offset, size)
            if w is not None:
                start, end, _, write = w
                if start <= offset and offset + size <= end:
                    write(offset - start, size, value & ((1 << (8 * size)) - 1))
                return
        end = min(offset + size, 256)
        cfg, wm, w1c = self.config, self.wmask, self.w1cmask
        with self._intx_lock:       # set_intx updates the status byte from the I/O thread
            for off in range(offset, end):
                b = (value >> (8 * (off - offset))) & 0xFF
                cfg[off] = ((cfg[off] & ~wm[off]) | (b & wm[off])) & ~(b & w1c[off]) & 0xFF
        if offset < BAR0 + 4 * BAR_COUNT and end > COMMAND:     # command or a BAR
            if offset < COMMAND + 2:
                self._drive_line()
            self._update_mappings()
        for start, wend, fn in self._watches:
            if offset < wend and end > start:
                fn()

    # --- decoding ---
    def bar_address(self, index):
        """Where BAR `index` decodes now (§6.2.2: only with I/O or memory
        space enabled), or None: disabled, unassigned, or out of range."""
        bar = self.bars[index]
        raw = self.get(bar.offset, 4)
        cmd = self.get(COMMAND, 2)
        if bar.io:
            addr, on, end = raw & BAR_IO_MASK, cmd & CMD_IO, IO_SPACE_END
        elif bar.is64:
            addr = (raw & BAR_MEM_MASK) | self.get(bar.offset + 4, 4) << 32
            on, end = cmd & CMD_MEMORY, MEM64_SPACE_END
        else:
            addr, on, end = raw & BAR_MEM_MASK, cmd & CMD_MEMORY, MEM_SPACE_END
        if not on or addr == 0 or addr + bar.size > end:
            return None
        return addr

    def _update_mappings(self):
        for bar in self.bars.values():
            new = self.bar_address(bar.index)
            if new != bar.mapped:
                old, bar.mapped = bar.mapped, new
                if self.on_map is not None:
                    bar.mapped = self.on_map(self, bar, old, new)

    # --- INTx ---
    def set_intx(self, level):
        """The device's interrupt request (level-triggered, §2.2.6)."""
        with self._intx_lock:
            self._intx = 1 if level else 0
            st = self.config[STATUS]
            self.config[STATUS] = (st | STATUS_INTERRUPT) if level else (st & ~STATUS_INTERRUPT)
            self._drive_line_locked()

    def _drive_line(self):
        with self._intx_lock:
            self._drive_line_locked()

    def _drive_line_locked(self):
        line = int(bool(self._intx) and not self.get(COMMAND, 2) & CMD_INTX_DISABLE)
        if line != self._line:
            self._line = line
            if self.irq_line is not None:
                self.irq_line(line)

    def __repr__(self):
        return f"<PciDevice {self.name} {self.get(VENDOR_ID, 2):04x}:{self.get(DEVICE_ID, 2):04x}>"


__all__ = ["Bar", "PciDevice"]
