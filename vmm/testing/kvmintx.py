"""KVM's part of a resample irqfd (vmm/pci/intx_irqfd.py), for tests and
benchmarks that drive a legacy virtio-pci transport without a VM.

KVM consumes each write to the trigger eventfd and asserts the line; the
guest takes the interrupt, its handler reads the virtio ISR (that read is
the acknowledgement, virtio 1.1 §4.1.4.5) and ends with an EOI, at which
KVM de-asserts the line and signals the resample eventfd.  Here:

    line = KvmIntx(transport._intx_irqfd)
    line.wait(timeout)      # an assertion came (trigger eventfd read): True
    driver.ack_interrupt()  # the handler's ISR read (the mock driver's regs)
    line.eoi()              # KVM at the EOI: line down, resample signalled

The C bench driver does the same with the two fds (bench/driver.c)."""
import os
import select

_ONE = (1).to_bytes(8, "little")


class KvmIntx:
    def __init__(self, intx):
        self.intx = intx
        self.asserted = False
        self.delivered = 0

    def pending(self):
        """Has the line been asserted since the last wait (no waiting)?"""
        return self.wait(0)

    def wait(self, timeout):
        fd = self.intx.trigger_fd
        if not select.select([fd], [], [], timeout)[0]:
            return False
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return False
        self.asserted = True
        self.delivered += 1
        return True

    def eoi(self):
        """The guest's EOI: KVM de-asserts the line and signals resample."""
        self.asserted = False
        os.write(self.intx.resample_fd, _ONE)
