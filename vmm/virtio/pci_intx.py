"""INTx for the virtio-pci transports (PCI 3.0 §2.2.6, virtio 1.1 §4.1.4.5):
the ISR's bits hold a level-triggered line up.

IntxInterrupt: the line follows the ISR through PciDevice.set_intx, whose
`irq_line(level)` is KVM_IRQ_LINE (or a test's callable): a Python call per
change, so queues stay on the Python path.

ResampledIntx: the line is a KVM resample irqfd (vmm/pci/intx_irqfd.py), an
eventfd like virtio-mmio's irqfd, so the queues can run on the C fast path
(vmm/virtio/fastpath.py), which ORs the ISR's used bit into its shared word
and writes the eventfd.  The rules, all under the transport's ISR lock:

- raise: a bit into the ISR; the eventfd is written (C: every interrupt;
  Python: when the ISR goes from 0 to non-zero, PciDevice.set_intx);
- the driver's ISR read clears the bits and nothing else: the line stays up
  until the EOI that ends the guest's handler (the IOAPIC's remote IRR
  keeps it from being delivered twice meanwhile); KVM then de-asserts it
  and signals the resample eventfd;
- resample (the I/O loop: in C, native/src/fastpath.c resample(), while
  the queues are on the fast path; Python otherwise): still bits in the
  ISR (set after the driver's read, or a driver that has not read yet) and
  Interrupt Disable clear: write the eventfd again.  A bit set after a
  resample's look comes with its own eventfd write; so no interrupt is
  left without a line;
- command bit 10 Interrupt Disable (§6.2.2) set: the queues leave the fast
  path (pv_fast_disable waits for a raise in progress), the line is forced
  low (IrqfdIntx.lower) and stays low, Python raising nothing while it is
  set; cleared: re-raised if the ISR has bits, queues back on the fast
  path;
- reset: ISR 0 and, if the line may be up, lowered at once;
- snapshots: the line's state is the ISR's (non-zero and not disabled),
  raised again on restore.

The transport mixing this in gives `self._intx_irqfd` (an IrqfdIntx, or
None for plain IntxInterrupt behaviour) before creating its notify fds,
and calls `_intx_attach()` once its PciDevice, I/O loop and notify fds
(the FastPath) exist.  (On software KVM, kvm_pvm, KVM signals a resample
when it delivers a level interrupt as well as at the handler's EOI: with
ISR bits still set the line goes up again, and the guest's handler may run
once more and read ISR 0: a spurious interrupt, harmless, as with
KVM_IRQ_LINE there.)"""
from vmm.pci import device as pd
from vmm.virtio import device as vd


class IntxInterrupt:
    """Level-triggered INTx (PCI 3.0 §2.2.6) for a virtio-pci transport: an
    ISR bit raises the line, and it drops once the driver's ISR read (or
    ack) has cleared every bit.  Shared by the legacy and modern transports."""

    def _raise_irq(self):
        self.pci.set_intx(1)

    def ack_interrupt(self, bits=0xFFFFFFFF):
        with self._isr_lock:
            old = self.interrupt_status
            self.interrupt_status = old & ~bits
            if not self.interrupt_status:
                self.pci.set_intx(0)
        return old


class ResampledIntx(IntxInterrupt):
    _intx_irqfd = None
    _intx_rq = None             # the resample eventfd's entry in the C fast loop
    _intx_disabled = False
    _intx_low_at = (0, 0)       # (interrupts, triggers) when the line was last seen low

    def _intx_attach(self):
        """Drive the PciDevice's line with the irqfd; service its resample
        eventfd on the I/O loop (in C too when the queues have a fast path:
        after _make_notify_fds); follow Interrupt Disable."""
        intx = self._intx_irqfd
        if intx is None:
            return
        self.pci.irq_line = self._intx_line
        self.pci.intx_status = self._intx_level
        self.pci.watch_config(pd.COMMAND, 2, self._intx_command)
        rq = None
        if self._fast is not None:
            from vmm.native import ffi
            rq = ffi.new("struct pv_fast_queue *")
            rq.notify_fd = intx.resample_fd
            rq.resample = 1
            rq.irq = self._fast.irq
            self._intx_rq = rq
        self._ioloop.add(intx.resample_fd, self._intx_resampled, fast=rq)

    def _fast_irq_fd(self):
        intx = self._intx_irqfd
        return intx.trigger_fd if intx is not None else None

    def fast_sync(self):
        """Queues (and the resample in C) on the fast path only while the
        line may be raised."""
        if self._fast is None:
            return
        live = (self.activated and not self._intx_disabled
                and not self.status & vd.DEVICE_NEEDS_RESET)
        self._fast.sync(self.device, live)
        if self._intx_rq is not None:
            self._intx_rq_off()
            if live:
                from vmm.native import lib
                lib.pv_fast_enable(self._intx_rq)

    def _intx_rq_off(self):
        """The resample back to Python (waits for a C call in progress)."""
        if self._intx_rq is not None:
            from vmm.native import lib
            lib.pv_fast_disable(self._intx_rq)

    # The ISR as Transport keeps it, plus a mirror of the bits Python holds
    # for the C resample (irq->held): the fast path's word is published to
    # `held` before it is taken, so the bits are in one of the two at every
    # moment a resample may look, but for a fold's last step; the folds
    # running beside the I/O thread are the driver's ISR reads, and that
    # read hands those bits to the driver itself.
    @property
    def interrupt_status(self):
        fast = self._fast
        if fast is not None and fast.irq.isr:
            fast.irq.held = self._isr | fast.irq.isr
            self._isr |= fast.take_isr()
            fast.irq.held = self._isr
        return self._isr

    @interrupt_status.setter
    def interrupt_status(self, value):
        self._isr = value
        if self._fast is not None:
            self._fast.irq.held = value

    @property
    def intx_resamples(self):
        """EOIs (resample signals) handled, in Python and in C."""
        intx, rq = self._intx_irqfd, self._intx_rq
        return (intx.resamples if intx is not None else 0) + (rq.kicks if rq is not None else 0)

    def _intx_line(self, level):
        """PciDevice's line (called under its lock, with the ISR lock held):
        up is a trigger; down is the EOI's business (or lower())."""
        if level:
            self._intx_irqfd.trigger()

    def _intx_level(self):
        """The device's interrupt request (PCI status bit 3, snapshots); a
        look that takes no bits from the fast path's word."""
        fast = self._fast
        return 1 if self._isr or (fast is not None and fast.irq.isr) else 0

    def _intx_resampled(self):
        """I/O loop (the C entry off): KVM de-asserted the line at an EOI."""
        intx = self._intx_irqfd
        if not intx.take_resample():
            return
        with self._isr_lock:
            seen = (self.interrupts, intx.triggers)   # before the look: a raise after it counts
            if self.interrupt_status and not self._intx_disabled:
                intx.trigger()
            else:
                self._intx_low_at = seen

    def _intx_command(self):
        """vCPU: a command register write; Interrupt Disable may have changed."""
        disabled = bool(self.pci.get(pd.COMMAND, 2) & pd.CMD_INTX_DISABLE)
        if disabled == self._intx_disabled:
            return
        with self.fast_hold():          # no raise in C meanwhile; fast_sync() after
            self._intx_rq_off()
            with self._isr_lock:
                self._intx_disabled = disabled
                if disabled:
                    self._intx_lower()
                elif self.interrupt_status:
                    self._intx_irqfd.trigger()

    def _intx_lower(self):
        """(ISR lock held, no raise or resample in C possible.)"""
        self._intx_irqfd.lower()
        self._intx_low_at = (self.interrupts, self._intx_irqfd.triggers)

    def _intx_reset(self):
        """After a device reset (queues off the fast path): the line down
        now if it may be up (raised since it was last seen low)."""
        if self._intx_irqfd is None:
            return
        self._intx_rq_off()             # back on at the next activation (fast_sync)
        with self._isr_lock:
            if (self.interrupts, self._intx_irqfd.triggers) != self._intx_low_at:
                self._intx_lower()

    def _intx_state(self):
        """The line as snapshots record it: up iff the ISR has bits."""
        if self._intx_irqfd is None:
            return self.pci._intx
        return self._intx_level()

    def _intx_close(self):
        intx = self._intx_irqfd
        if intx is not None:
            self._intx_rq_off()
            if self._ioloop is not None:
                self._ioloop.remove(intx.resample_fd)
            intx.close()
