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
- resample (the I/O loop): still bits in the ISR (set after the driver's
  read, or a driver that has not read yet) and Interrupt Disable clear:
  write the eventfd again.  A bit set after a resample's look finds the
  ISR's word as the C side left it, and that side writes the eventfd
  itself; so no interrupt is left without a line;
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
and calls `_intx_attach()` once its PciDevice and I/O loop exist."""
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
    _intx_disabled = False
    _intx_low_at = (0, 0)       # (interrupts, triggers) when the line was last seen low

    def _intx_attach(self):
        """Drive the PciDevice's line with the irqfd; service its resample
        eventfd on the I/O loop; follow Interrupt Disable."""
        intx = self._intx_irqfd
        if intx is None:
            return
        self.pci.irq_line = self._intx_line
        self.pci.intx_status = self._intx_level
        self.pci.watch_config(pd.COMMAND, 2, self._intx_command)
        self._ioloop.add(intx.resample_fd, self._intx_resampled)

    def _fast_irq_fd(self):
        intx = self._intx_irqfd
        return intx.trigger_fd if intx is not None else None

    def fast_sync(self):
        """Queues on the fast path only while the line may be raised."""
        if self._fast is not None:
            self._fast.sync(self.device, self.activated and not self._intx_disabled
                            and not self.status & vd.DEVICE_NEEDS_RESET)

    def _intx_line(self, level):
        """PciDevice's line (called under its lock, with the ISR lock held):
        up is a trigger; down is the EOI's business (or lower())."""
        if level:
            self._intx_irqfd.trigger()

    def _intx_level(self):
        """The device's interrupt request (PCI status bit 3, snapshots)."""
        with self._isr_lock:
            return 1 if self.interrupt_status else 0

    def _intx_resampled(self):
        """I/O loop: KVM de-asserted the line at an EOI."""
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
            with self._isr_lock:
                self._intx_disabled = disabled
                if disabled:
                    self._intx_lower()
                elif self.interrupt_status:
                    self._intx_irqfd.trigger()

    def _intx_lower(self):
        """(ISR lock held, no fast raise possible.)"""
        self._intx_irqfd.lower()
        self._intx_low_at = (self.interrupts, self._intx_irqfd.triggers)

    def _intx_reset(self):
        """After a device reset (fast path off): the line down now if it
        may be up (raised since it was last seen low)."""
        if self._intx_irqfd is None:
            return
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
            if self._ioloop is not None:
                self._ioloop.remove(intx.resample_fd)
            intx.close()
