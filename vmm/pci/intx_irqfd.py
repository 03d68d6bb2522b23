"""A level-triggered PCI INTx line (PCI 3.0 §2.2.6) delivered through a KVM
resample irqfd (KVM API doc 4.75, KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE),
the design QEMU's VFIO and crosvm use for INTx.

A write to `trigger_fd` asserts the line (the GSI) inside KVM, with no
ioctl; it stays asserted until the guest's EOI of that interrupt, when KVM
de-asserts it and signals `resample_fd`.  The device's owner services
`resample_fd` (its I/O loop) and writes `trigger_fd` again if the device
still wants the interrupt (a virtio ISR with bits left).  So nobody lowers
the line when the driver acknowledges the device: it drops at the EOI that
follows, and the IOAPIC does not deliver it again in between (its remote
IRR bit holds it until that EOI).  Because the trigger is a plain eventfd,
the C fast path (native/src/fastpath.c) raises it exactly as it raises
virtio-mmio's irqfd.

`lower()` forces the line down at once (command register Interrupt
Disable, a device reset with the line up): KVM de-asserts a GSI when its
last resample irqfd is deassigned, so the irqfd is deassigned and assigned
again (an ioctl pair; off the data path).

    intx = IrqfdIntx(lambda t, r, deassign=False: vm.irqfd(t, gsi, deassign, r))
    intx.trigger()              # assert (any thread)
    intx.take_resample()        # on resample_fd readable: True if KVM signalled it
    intx.lower()
    intx.close()

Without `register` nobody hands the fds to KVM: tests and benchmarks play
KVM's part (wait on trigger_fd; after acknowledging, write resample_fd)."""
import os

_ONE = (1).to_bytes(8, "little")


def _eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd):
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class IrqfdIntx:
    def __init__(self, register=None):
        """`register(trigger_fd, resample_fd, deassign=False)` binds (or
        unbinds) the pair to the line's GSI (Vm.irqfd with resample_fd)."""
        self._register = register
        self.trigger_fd = _eventfd()
        self.resample_fd = _eventfd()
        self.triggers = 0           # writes made here (the C fast path writes the fd itself)
        self.resamples = 0          # EOIs seen on resample_fd
        self.lowered = 0            # forced lowers (irqfd re-bound)
        self._bound = False
        try:
            self._bind()
        except BaseException:
            self._close_fds()
            raise

    def _bind(self):
        if self._register is not None:
            self._register(self.trigger_fd, self.resample_fd)
            self._bound = True

    def trigger(self):
        """Assert the line (KVM: until the guest's next EOI of it)."""
        self.triggers += 1
        os.write(self.trigger_fd, _ONE)

    def take_resample(self):
        """Consume the resample signal; True if there was one (the line was
        de-asserted at an EOI since the last call)."""
        n = _drain(self.resample_fd)
        self.resamples += n
        return n > 0

    def lower(self):
        """The line low now.  The caller makes sure nobody triggers it
        meanwhile (the fast path held off, the ISR lock taken)."""
        _drain(self.trigger_fd)             # a write KVM has not consumed (no KVM: a test's)
        if self._bound:
            # KVM_IRQFD deassign waits for the irqfd's pending injection and,
            # its last resampler gone, de-asserts the GSI (virt/kvm/eventfd.c)
            self._register(self.trigger_fd, self.resample_fd, deassign=True)
            self._bound = False
            self._bind()
        self.lowered += 1

    def close(self):
        """Close both fds.  No deassign ioctl: closing the trigger eventfd
        ends KVM's irqfd by itself (EPOLLHUP, virt/kvm/eventfd.c), VM or not."""
        self._bound = False
        self._close_fds()

    def _close_fds(self):
        for fd in (self.trigger_fd, self.resample_fd):
            if fd >= 0:
                os.close(fd)
        self.trigger_fd = self.resample_fd = -1


__all__ = ["IrqfdIntx"]
