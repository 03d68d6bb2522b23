"""Wiring a modern or transitional virtio-pci function into a Machine (the
counterpart of vmm.virtio.pci_legacy.VirtioPciAttachment).

`attach()` takes an IRQ for the INTx fallback (a driver that cannot use
MSI-X, §4.1.5.3), puts the function on the machine's PCI bus, gives its
MSI-X vectors GSIs, irqfds and routes through machine.vm, and binds each
queue's notify address to an ioeventfd (MMIO for the modern notify
region, port I/O for a transitional device's legacy QUEUE_NOTIFY)."""


class VirtioPciModernAttachment:
    def __init__(self, open_device, transitional=False):
        self.open_device = open_device
        self.transitional = transitional
        self.transport = None
        self.slot = self.irq = None

    def attach(self, machine, cmdline):
        from vmm.pci import bus as pci_bus
        from vmm.virtio.pci_modern import VirtioPciModern
        device = self.open_device()
        try:
            irq = machine.slots.take_irq()
            bus = pci_bus.get_or_create(machine)
            vm = machine.vm

            def ioeventfd(fd, addr, length, datamatch=None, pio=False, deassign=False):
                vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio, deassign=deassign)

            self.transport = VirtioPciModern(
                device, machine.memory, vm=vm, irq_line=lambda level: vm.set_irq_line(irq, level),
                ioeventfd=ioeventfd, ioloop=machine.ioloop(), transitional=self.transitional)
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
            self.transport.close()          # flushes and closes the backend, frees vectors
            self.transport = None
