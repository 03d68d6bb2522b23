"""Modern virtio-pci registers (virtio 1.1 §4.1.4) for a MockDriver, used
the way Linux's virtio_pci_modern does: the common, notify, ISR and device
regions are found by walking the vendor capabilities in configuration space,
each common-configuration field is accessed with its own width (64-bit queue
addresses as two 32-bit halves), and MSI-X can be enabled with one vector
per queue plus one for configuration changes."""
from vmm.testing.mockdriver import DriverError, DriverQueue
from vmm.virtio import pci_modern as pm


class PciModernRegs:
    """Modern virtio-pci (§4.1.4) through its capabilities, for a MockDriver.
    `msix=True` enables MSI-X (Message Control) and maps config to vector 0
    and queue n to vector n + 1, with table entries unmasked."""
    features_ok = True
    MSI_ADDRESS = 0xFEE00000

    def __init__(self, t, msix=False):
        self.t, self.pci, self.msix = t, t.pci, msix
        self.caps = {}                  # cfg_type -> (bar, offset, length, extra bytes)
        self.msix_cap = None
        off = self.pci.read_config(0x34, 1)
        seen = 0
        while off and seen < 48:
            cap_id = self.pci.read_config(off, 1)
            if cap_id == pm.CAP_VENDOR:
                cap_len, cfg_type, bar = (self.pci.read_config(off + i, 1) for i in (2, 3, 4))
                extra = bytes(self.pci.read_config(off + 16 + i, 1) for i in range(cap_len - 16))
                self.caps.setdefault(cfg_type, (bar, self.pci.read_config(off + 8, 4),
                                                self.pci.read_config(off + 12, 4), extra, off))
            elif cap_id == 0x11:
                self.msix_cap = off
            off = self.pci.read_config(off + 1, 1)
            seen += 1

    def region(self, cfg_type):
        bar, offset, length, _, _ = self.caps[cfg_type]
        return self.pci.bars[bar].handler, offset

    def common(self, name, value=None):
        """Read (value None) or write one common-configuration field."""
        h, base = self.region(pm.CAP_COMMON)
        off, width = pm.COMMON_FIELDS[name]
        if value is None:
            if width == 8:
                return h.read(base + off, 4) | h.read(base + off + 4, 4) << 32
            return h.read(base + off, width)
        if width == 8:
            h.write(base + off, 4, value & 0xFFFFFFFF)
            h.write(base + off + 4, 4, value >> 32)
        else:
            h.write(base + off, width, value)

    def check(self):
        if not {pm.CAP_COMMON, pm.CAP_NOTIFY, pm.CAP_ISR, pm.CAP_DEVICE} <= set(self.caps):
            raise DriverError("modern virtio-pci capabilities missing")

    def status(self):
        return self.common("device_status")

    def write_status(self, value):
        self.common("device_status", value)

    def device_features(self):
        f = 0
        for sel in (0, 1):
            self.common("device_feature_select", sel)
            f |= self.common("device_feature") << (32 * sel)
        return f

    def write_features(self, features):
        for sel in (0, 1):
            self.common("driver_feature_select", sel)
            self.common("driver_feature", (features >> (32 * sel)) & 0xFFFFFFFF)

    def config(self, offset, size):
        h, base = self.region(pm.CAP_DEVICE)
        return h.read(base + offset, size)

    def kick(self, q):
        h, base = self.region(pm.CAP_NOTIFY)
        mult = int.from_bytes(self.caps[pm.CAP_NOTIFY][3][:4], "little")
        self.common("queue_select", q)
        h.write(base + self.common("queue_notify_off") * mult, 2, q)

    def ack_interrupt(self):
        h, base = self.region(pm.CAP_ISR)
        return h.read(base, 1)

    def enable_msix(self, vectors):
        """MSI-X on, and table entries 0..vectors-1 unmasked (vector v's
        message: data 0x40 + v)."""
        ctrl = self.msix_cap + 2
        self.pci.write_config(ctrl, 2, self.pci.read_config(ctrl, 2) | 0x8000)
        bir = self.pci.read_config(self.msix_cap + 4, 4)
        h = self.pci.bars[bir & 7].handler
        for v in range(vectors):
            e = (bir & ~7) + 16 * v
            h.write(e, 4, self.MSI_ADDRESS)
            h.write(e + 4, 4, 0)
            h.write(e + 8, 4, 0x40 + v)
            h.write(e + 12, 4, 0)

    def setup_queues(self, drv, queue_sizes):
        n = self.common("num_queues")
        if self.msix:
            self.enable_msix(n + 1)
            self.common("config_msix_vector", 0)
            if self.common("config_msix_vector") != 0:
                raise DriverError("config vector not accepted")
        queues = []
        for i in range(n):
            self.common("queue_select", i)
            if self.common("queue_enable"):
                raise DriverError(f"queue {i} already live")
            qmax = self.common("queue_size")
            size = min(qmax, queue_sizes[i]) if queue_sizes else qmax
            q = DriverQueue(drv, i, size)
            self.common("queue_size", size)
            self.common("queue_desc", q.desc)
            self.common("queue_driver", q.avail)
            self.common("queue_device", q.used)
            if self.msix:
                self.common("queue_msix_vector", i + 1)
                if self.common("queue_msix_vector") != i + 1:
                    raise DriverError(f"queue {i} vector not accepted")
            self.common("queue_enable", 1)
            queues.append(q)
        return queues
