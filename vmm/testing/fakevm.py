"""A Vm without KVM for unit tests: the real routing-table logic of
vmm.kvm.vm.Vm (default irqchip routes + MSI routes, one owner), with every
table it would send, every irqfd and ioeventfd call recorded instead of
reaching /dev/kvm.  `refuse(address)` makes tables with that MSI address
fail as KVM would (EINVAL)."""
import errno
import threading

from vmm.kvm.vm import IOAPIC_PINS, Vm
from vmm.native import NativeError


class FakeVm(Vm):
    def __init__(self):           # no KVM_CREATE_VM
        self.fd = -1
        self._slots = 0
        self._routing_lock = threading.Lock()
        self._msi_routes = {}
        self._next_gsi = IOAPIC_PINS
        self.routing_updates = 0
        self.tables = []          # every table "sent" with KVM_SET_GSI_ROUTING
        self.irqfds = {}          # gsi -> eventfd currently bound
        self.calls = []           # ("irqfd" | "ioeventfd" | "irq_line", ...) in order
        self.refused = set()

    def refuse(self, address):
        self.refused.add(address)

    def set_gsi_routing(self, table):
        if any(kind == "msi" and a in self.refused for _, kind, a, _ in table):
            raise NativeError("KVM_SET_GSI_ROUTING", errno.EINVAL)
        self.tables.append(list(table))

    resample = False            # KVM_CAP_IRQFD_RESAMPLE as this fake reports it

    def irqfd_resample_supported(self):
        return self.resample

    def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
        self.calls.append(("irqfd", fd, gsi, deassign) if resample_fd is None
                          else ("irqfd", fd, gsi, deassign, resample_fd))
        if deassign:
            self.irqfds.pop(gsi, None)
        else:
            self.irqfds[gsi] = fd

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        self.calls.append(("ioeventfd", fd, addr, length, datamatch, pio, deassign))

    def set_irq_line(self, gsi, level):
        self.calls.append(("irq_line", gsi, level))

    def close(self):
        pass
