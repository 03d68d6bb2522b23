"""What every virtio transport shares (virtio 1.1 §4): the queues, the device
status state machine (§2.1, §3.1.1), feature negotiation for modern and
legacy drivers (§6.1, §7.2), activation, driver notifications (directly or
through eventfds serviced by an IoLoop), the interrupt status (ISR) bits and
the legacy ring layout (§2.6.2).

Subclasses decode their registers (VirtioMmio: §4.2; VirtioPciLegacy:
§4.1.4.8) and may override `_raise_irq()` / `ack_interrupt()` to change how
an interrupt reaches the driver (an edge through a KVM irqfd for mmio, a
level-triggered INTx line for PCI).
"""
import logging
import os
import threading

from vmm.virtio import device as vd
from vmm.virtio.ioloop import drain_eventfd, signal_eventfd
from vmm.virtio.queue import QueueError, QueueState, Virtqueue, set_ring_progress

log = logging.getLogger("pyvmm.virtio")

_ONE = (1).to_bytes(8, "little")
LEGACY_PAGE = 4096          # §2.6.2 / §4.1.4.8: legacy queue alignment and PFN unit


class Transport(vd.Interrupt):
    NAME = "virtio"

    def __init__(self, device, mem, irq=None, ioloop=None, legacy=False):
        self.device = device
        self.mem = mem
        self.legacy = legacy
        self._irq = irq
        self._ioloop = ioloop
        self._lock = threading.RLock()      # status, activation and queue processing
        self._isr_lock = threading.Lock()
        # Guards read-modify-writes of `status`: needs_reset() comes from a
        # device thread that may hold the device's own lock (virtio-net), so
        # it cannot take self._lock (lock order: _lock -> device -> this one).
        self._status_lock = threading.Lock()
        self.queues = [Virtqueue(i, n) for i, n in enumerate(device.queue_max_sizes)]
        self._notify_fds = []
        self._fast = None                   # vmm/virtio/fastpath.py (mmio with an irqfd)
        self._isr = 0
        self._interrupts = 0
        self.config_generation = 0
        self.needs_reset_reason = None
        self._reset_state()

    def _make_notify_fds(self, register=None):
        """One eventfd per queue, serviced by the I/O loop; `register(fd,
        queue_index)` hands each to KVM (KVM_IOEVENTFD)."""
        if self._ioloop is None:
            raise ValueError("queue notify eventfds need an ioloop to service them")
        irq_fd = self._fast_irq_fd()
        if irq_fd is not None and getattr(self.device, "fast_capable", False):
            from vmm.virtio.fastpath import FastPath
            self._fast = FastPath(irq_fd, len(self.queues))
        try:
            for q in self.queues:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._notify_fds.append(fd)
                if register is not None:
                    register(fd, q.index)
                fast = self._fast.queue(q.index, fd) if self._fast is not None else None
                self._ioloop.add(fd, self._eventfd_handler(fd, q.index), fast=fast)
        except BaseException:
            self._close_notify_fds()    # the caller never gets a transport to close
            raise

    def _fast_irq_fd(self):
        """The interrupt eventfd the C fast path writes (None: no fast path):
        the irqfd given as `irq`, unless a subclass raises interrupts its
        own way (it may then offer its own eventfd: pci_legacy.py's INTx)."""
        if isinstance(self._irq, int) and type(self)._raise_irq is Transport._raise_irq:
            return self._irq
        return None

    @property
    def notify_fds(self):
        return list(self._notify_fds)

    # The ISR and the interrupt count: the C fast path ORs its bits into a
    # shared word, folded in here on every access (under _isr_lock).
    @property
    def interrupt_status(self):
        if self._fast is not None:
            self._isr |= self._fast.take_isr()
        return self._isr

    @interrupt_status.setter
    def interrupt_status(self, value):
        self._isr = value

    @property
    def interrupts(self):
        """Interrupts signalled (for tests and stats)."""
        return self._interrupts + (self._fast.interrupts if self._fast is not None else 0)

    @interrupts.setter
    def interrupts(self, value):
        self._interrupts = value - (self._fast.interrupts if self._fast is not None else 0)

    def fast_sync(self):
        """(Re)decide which queues run on the C fast path (after activation,
        a reset, DEVICE_NEEDS_RESET, or a device configuration change)."""
        if self._fast is not None:
            self._fast.sync(self.device, self.activated
                            and not self.status & vd.DEVICE_NEEDS_RESET)

    def fast_hold(self):
        """Context: no queue on the fast path meanwhile; re-decided after."""
        import contextlib

        @contextlib.contextmanager
        def hold():
            if self._fast is not None:
                self._fast.disable()
            try:
                yield
            finally:
                self.fast_sync()
        return hold()

    def _reset_state(self):
        with self._status_lock:
            self.status = 0
        if self._fast is not None:
            self._fast.take_isr()           # bits raised for the old rings
        self.interrupt_status = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.activated = False
        self._pfn = [0] * len(self.queues)
        for q in self.queues:
            q.reset()

    def reset(self):
        """§2.1.1 status write of 0: device and transport to initial state."""
        with self._lock:
            if self._fast is not None:
                self._fast.disable()        # the C side must not touch the old rings
            self.device.reset()
            self._reset_state()
            self.needs_reset_reason = None
        self.ack_interrupt()

    def _close_notify_fds(self):
        if self._fast is not None:
            self._fast.disable()
        for fd in self._notify_fds:
            if self._ioloop is not None:
                self._ioloop.remove(fd)
            os.close(fd)
        self._notify_fds = []

    def close(self):
        """Detach the notify eventfds and close the device (after the VM stopped)."""
        self._close_notify_fds()
        with self._lock:
            self.device.close()

    # --- snapshots (see vmm/virtio/device.py) ---
    # A transport subclass sets this once _extra_state()/_restore_extra()
    # cover every register it adds (mmio, legacy PCI, and modern PCI with
    # MSI-X through pci_persist.py do): otherwise a snapshot is refused
    # rather than silently partial.
    SNAPSHOT = False

    def state(self):
        """Transport registers, queues and the device's state, as a dict
        (call with the I/O thread stopped and the vCPUs paused)."""
        if not self.SNAPSHOT:
            raise NotImplementedError(f"{type(self).__name__} ({self.NAME}) does not support "
                                      "snapshots yet")
        with self._lock:
            rings = self.device.rings() if self.activated else {}
            return {
                "transport": self.NAME, "device_type": self.device.device_type,
                "status": self.status, "interrupt_status": self.interrupt_status,
                "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                "activated": self.activated, "pfn": list(self._pfn),
                "config_generation": self.config_generation,
                "needs_reset_reason": self.needs_reset_reason,
                "queues": [q.state(rings.get(q.index)).to_dict() for q in self.queues],
                "device": self.device.state(),
                **self._extra_state(),
            }

    def restore(self, st):
        """Load state() into this freshly attached transport; re-activates
        the device with its rings where they were (no reset seen by the
        driver).  Then call restart() once the VM is ready to run."""
        if st.get("transport") != self.NAME or st.get("device_type") != self.device.device_type:
            raise vd.VirtioError(f"snapshot has a {st.get('transport')} device of type "
                                 f"{st.get('device_type')} here, not {self.NAME} type "
                                 f"{self.device.device_type}")
        if len(st["queues"]) != len(self.queues):
            raise vd.VirtioError(f"{self.NAME}: snapshot has {len(st['queues'])} queues, "
                                 f"the device {len(self.queues)}")
        with self._lock:
            self.device.restore(st["device"])
            self.status = int(st["status"]) & 0xFF
            self.interrupt_status = int(st["interrupt_status"])
            self.driver_features = int(st["driver_features"])
            self.queue_sel = int(st["queue_sel"])
            self._pfn = [int(p) for p in st["pfn"]]
            self.config_generation = int(st["config_generation"])
            self.needs_reset_reason = st.get("needs_reset_reason")
            states = [QueueState.from_dict(q) for q in st["queues"]]
            for q, qs in zip(self.queues, states):
                if qs.size > q.max_size and qs.ready:
                    raise vd.VirtioError(f"{self.NAME}: snapshot queue {q.index} size {qs.size} "
                                         f"above the device's {q.max_size}")
                q.restore(qs)
            self._restore_extra(st)
            if st["activated"]:
                self.device.activate(self.mem, self.queues, self)
                self.activated = True
                rings = self.device.rings()
                for q, qs in zip(self.queues, states):
                    if q.index in rings and rings[q.index] is not None:
                        set_ring_progress(rings[q.index], qs)
                self.fast_sync()

    def restart(self):
        """After a restore: raise the interrupt the driver had not yet seen,
        and look at every queue once (work queued while paused)."""
        with self._isr_lock:
            if self.interrupt_status:
                self._raise_irq()
        if self.activated:
            for q in self.queues:
                self.notify(q.index)

    def _extra_state(self):
        return {}

    def _restore_extra(self, st):
        pass

    # --- Interrupt (called by the device, possibly on the I/O thread) ---
    def _signal(self, bit):
        with self._isr_lock:
            self.interrupt_status |= bit
            self._interrupts += 1
            # on the I/O thread: raised just before it sleeps (IoLoop.defer)
            if self._ioloop is None or not self._ioloop.defer(self, self._raise_deferred):
                self._raise_irq()

    def _raise_deferred(self):
        """A deferred _raise_irq: nothing if the driver acknowledged
        everything meanwhile (a level line must not go up with ISR 0, so an
        overriding _raise_irq runs under the lock); an edge (the eventfd)
        is written after the lock is let go, so the woken driver's ISR read
        does not wait for it."""
        with self._isr_lock:
            if not self.interrupt_status:
                return
            if type(self)._raise_irq is not Transport._raise_irq:
                self._raise_irq()
                return
        Transport._raise_irq(self)

    def _raise_irq(self):
        """Tell the driver (called with the ISR lock held): an 8-byte 1 to an
        eventfd such as a KVM irqfd, or a call."""
        irq = self._irq
        if irq is None:
            return
        if callable(irq):
            irq()
        else:
            os.write(irq, _ONE)

    def ack_interrupt(self, bits=0xFFFFFFFF):
        """Clear ISR `bits`; returns the bits that were set."""
        with self._isr_lock:
            old = self.interrupt_status
            self.interrupt_status = old & ~bits
        return old

    def used(self, queue_index=0):
        self._signal(vd.INT_USED)

    def config(self):
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._signal(vd.INT_CONFIG)

    def needs_reset(self, reason):
        """Any thread (an I/O thread, possibly holding the device's lock)."""
        log.warning("%s %s: device needs reset: %s", self.NAME, type(self.device).__name__, reason)
        if self._fast is not None:
            self._fast.disable()
        with self._status_lock:     # against a vCPU's concurrent status write
            self.needs_reset_reason = str(reason)
            self.status |= vd.DEVICE_NEEDS_RESET
            live = self.status & vd.DRIVER_OK
        if live:                                # §2.1.2
            self._signal(vd.INT_CONFIG)

    # --- notifications ---
    def _eventfd_handler(self, fd, index):
        def handler():
            drain_eventfd(fd)
            err = self._fast.take_error(index) if self._fast is not None else 0
            if err:         # the C fast path's engine found the ring malformed
                self.needs_reset(QueueError(err, index))
                return
            if self._notify_once(index):
                # the device's budget ran out: come back after the loop's
                # other fds (and a possible stop request), as for a new kick
                signal_eventfd(fd)
        return handler

    def notify(self, index):
        """A driver notification for queue `index` written on a vCPU thread
        (no ioeventfd): that vCPU waits until the queue is drained."""
        while self._notify_once(index):
            pass

    def _notify_once(self, index):
        """One device call; True if the device has work left."""
        with self._lock:
            if (not self.activated or self.status & vd.DEVICE_NEEDS_RESET
                    or not 0 <= index < len(self.queues)):
                return False
            try:
                if self._fast is not None:
                    with self._fast.held(index):      # not both threads on one ring
                        return bool(self.device.queue_notify(index))
                return bool(self.device.queue_notify(index))
            except Exception as e:   # a device bug must not take the VMM down
                log.error("virtio device %s: queue %d: internal error: %s",
                          type(self.device).__name__, index, e)
                log.debug("traceback", exc_info=True)   # with --debug
                self.needs_reset(f"internal error: {e}")
                return False

    # --- features and queues ---
    def _offered(self):
        f = self.device.features
        if self.legacy:      # §7.2 / §4.2.4: a legacy interface does not offer VERSION_1
            f &= ~vd.bit(vd.VIRTIO_F_VERSION_1)
        return f

    def _queue(self):
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _queue_writable(self, q, what):
        if self.status & vd.DRIVER_OK:
            log.debug("%s: queue %d %s write while live ignored", self.NAME, q.index, what)
            return False
        return True

    def set_queue_pfn(self, q, pfn, page_size=LEGACY_PAGE, align=LEGACY_PAGE):
        """§2.6.2 legacy layout, the whole ring from page `pfn`: descriptors,
        the available ring right after, the used ring at the next `align`
        boundary.  PFN 0 releases the queue (§4.1.4.8)."""
        if not self._queue_writable(q, "PFN"):
            return
        self._pfn[q.index] = pfn
        if pfn == 0:
            q.ready = False
            q.desc = q.driver = q.device = 0
            return
        align = align or LEGACY_PAGE
        q.desc = pfn * page_size
        q.driver = q.desc + 16 * q.size
        q.device = (q.driver + 6 + 2 * q.size + align - 1) // align * align
        q.ready = True

    # --- §2.1 / §3.1.1 status state machine ---
    def _write_status(self, value):
        with self._lock:
            if value == 0:
                self.reset()
                return
            old = self.status & ~vd.DEVICE_NEEDS_RESET
            value &= 0xFF & ~vd.DEVICE_NEEDS_RESET      # only the device sets it
            if old & ~value:
                log.warning("%s: driver tried to clear status bits (0x%x -> 0x%x)", self.NAME, old, value)
                return
            new = value & ~old
            if new & vd.FEATURES_OK and not self.legacy and not self._features_ok(value):
                value &= ~vd.FEATURES_OK        # §3.1.1 step 6: driver re-reads, sees it unset
            if new & vd.DRIVER_OK:
                if not self.legacy and not value & vd.FEATURES_OK:
                    log.warning("%s: DRIVER_OK without FEATURES_OK ignored", self.NAME)
                    value &= ~vd.DRIVER_OK
                else:
                    if self.legacy:     # §7.2: no FEATURES_OK, features are final now
                        self.device.acked_features = self.driver_features & self._offered()
                    self._set_status(value)
                    self._activate()
                    return
            self._set_status(value)

    def _set_status(self, value):
        with self._status_lock:     # keep a DEVICE_NEEDS_RESET set meanwhile
            self.status = value | (self.status & vd.DEVICE_NEEDS_RESET)

    def _features_ok(self, value):
        need = vd.ACKNOWLEDGE | vd.DRIVER
        offered = self._offered()
        drv = self.driver_features
        if value & need != need:
            log.warning("%s: FEATURES_OK before ACKNOWLEDGE|DRIVER", self.NAME)
            return False
        if drv & ~offered:
            log.warning("%s: driver accepted unoffered features 0x%x", self.NAME, drv & ~offered)
            return False
        if not drv & vd.bit(vd.VIRTIO_F_VERSION_1):
            log.warning("%s: driver did not accept VIRTIO_F_VERSION_1", self.NAME)
            return False
        self.device.acked_features = drv
        return True

    def _activate(self):
        try:
            self.device.activate(self.mem, self.queues, self)
            self.activated = True
            self.fast_sync()
        except Exception as e:
            self.needs_reset(e)
