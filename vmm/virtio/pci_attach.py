"""Wiring a virtio-pci function into a Machine (MachineConfig.devices).

`open_device()` (the constructor argument, or a subclass's method) returns
the VirtioDevice.  `attach()` takes an IRQ from machine.slots for INTx (the
legacy device's only interrupt; for a modern one the fallback of a driver
that cannot use MSI-X, §4.1.5.3), puts the function on the machine's PCI bus
(created on first use), routes INTA# to that IOAPIC input through the MP
table (machine.pci_irqs), drives the line (legacy: a KVM resample irqfd if KVM has
it, else KVM_IRQ_LINE; modern: KVM_IRQ_LINE) and binds each
queue's notify address to an ioeventfd.  No kernel parameter is needed: the
guest enumerates the bus.  The transports differ only in `_transport()`:

- legacy (vmm.virtio.pci_legacy): notifications are port I/O on BAR 0;
- modern and transitional (vmm.virtio.pci_modern): MSI-X vectors get GSIs,
  irqfds and routes through machine.vm; the notify region is MMIO, and a
  transitional device's legacy QUEUE_NOTIFY is port I/O as well."""


class PciAttachment:
    def __init__(self, open_device=None):
        if open_device is not None:
            self.open_device = open_device
        self.transport = None
        self.slot = self.irq = None

    def open_device(self):
        raise NotImplementedError

    def _transport(self, device, machine, irq_line):
        raise NotImplementedError

    def attach(self, machine, cmdline):
        from vmm.pci import bus as pci_bus
        device = self.open_device()
        try:
            irq = machine.slots.take_irq()
            bus = pci_bus.get_or_create(machine)
            vm = machine.vm
            self.irq = irq
            self.transport = self._transport(device, machine,
                                             lambda level: vm.set_irq_line(irq, level))
            self.slot = bus.add(self.transport.pci, irq=irq)
        except BaseException:
            if self.transport is not None:
                self.transport.close()
                self.transport = None
            else:
                device.close()
            raise
        self.irq = irq
        machine.pci_irqs.append((self.slot, 0, irq))     # INTA# of device `slot`
        return cmdline

    def close(self):
        if self.transport is not None:
            self.transport.close()          # flushes and closes the backend (frees MSI-X vectors)
            self.transport = None


class VirtioPciAttachment(PciAttachment):
    """A virtio device on legacy virtio-pci.  Its INTx is a KVM resample
    irqfd when KVM has one (KVM_CAP_IRQFD_RESAMPLE; vmm/pci/intx_irqfd.py),
    which puts its queues on the C fast path; KVM_IRQ_LINE otherwise (or
    with `intx_resample=False`)."""

    intx_resample = True

    def _transport(self, device, machine, irq_line):
        from vmm.virtio.pci_legacy import VirtioPciLegacy
        vm, gsi = machine.vm, self.irq

        def ioeventfd(fd, port, length, datamatch, deassign=False):
            vm.ioeventfd(fd, port, length, datamatch=datamatch, pio=True, deassign=deassign)

        intx = None
        if self.intx_resample and vm.irqfd_resample_supported():
            from vmm.pci.intx_irqfd import IrqfdIntx
            intx = IrqfdIntx(lambda trigger, resample, deassign=False: vm.irqfd(
                trigger, gsi, deassign=deassign, resample_fd=resample))
        try:
            return VirtioPciLegacy(device, machine.memory, irq_line=irq_line,
                                   ioeventfd=ioeventfd, ioloop=machine.ioloop(), intx=intx)
        except BaseException:
            if intx is not None:
                intx.close()
            raise


class VirtioPciModernAttachment(PciAttachment):
    """A virtio device on modern (or, transitional=True, transitional) virtio-pci."""

    def __init__(self, open_device=None, transitional=False):
        super().__init__(open_device)
        self.transitional = transitional

    def _transport(self, device, machine, irq_line):
        from vmm.virtio.pci_modern import VirtioPciModern
        vm = machine.vm

        def ioeventfd(fd, addr, length, datamatch=None, pio=False, deassign=False):
            vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio, deassign=deassign)

        return VirtioPciModern(device, machine.memory, vm=vm, irq_line=irq_line,
                               ioeventfd=ioeventfd, ioloop=machine.ioloop(),
                               transitional=self.transitional)
