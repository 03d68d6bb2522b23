"""A VM built from a MachineConfig: memory, vCPUs, boot state, devices and the
run loop.  `Machine(config).run()` returns the exit status (see STATUS)."""
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

from vmm.arch.x86 import boot, cpuid, layout, loader, mptable, regs
from vmm.bus import Bus
from vmm.devices import Slots
from vmm.hw.i8042 import DATA_PORT, I8042
from vmm.hw.pvpanic import PVPANIC_PORT, PvPanic
from vmm.hw.serial import COM1_IRQ, COM1_PORT, Serial
from vmm.kvm.system import Kvm
from vmm.kvm.vcpu import Vcpu
from vmm.kvm.vm import Vm
from vmm.memory import GuestMemory
from vmm.vcpu_thread import VcpuThread, install_kick_handler

log = logging.getLogger("pyvmm")

# Exit status of `pyvmm run` for each way a machine stops.
STATUS = {
    "poweroff": 0,   # guest powered off (halted with interrupts off, or system event)
    "reset": 0,      # guest rebooted (i8042 reset, reboot=k)
    "quit": 0,       # the user pressed the quit key
    "error": 1,      # VMM error while running
    "panic": 3,      # guest kernel panic (pvpanic)
    "crash": 4,      # triple fault, KVM internal error or entry failure
    "timeout": 124,  # --timeout expired (as timeout(1))
    "signal": 130,   # SIGINT/SIGTERM/SIGHUP to the VMM
}

POWER_OFF_POLL = 0.25 # seconds between checks for all vCPUs halted with IF=0


@dataclass
class MachineConfig:
    kernel: str
    initrd: Optional[str] = None
    cmdline: str = "console=ttyS0"
    mem_size: int = 256 << 20
    cpus: int = 1
    cpu_template: str = "auto"
    serial_out: Optional[object] = None      # binary file object; None = stdout
    serial_in: Optional[int] = None          # fd to read console input from
    timeout: Optional[float] = None
    devices: List[object] = field(default_factory=list)
    track_dirty_pages: bool = False          # KVM dirty log on, for diff snapshots
    restore: Optional[object] = None         # a vmm.snapshot.Restore: build from a snapshot


class Machine:
    def __init__(self, config):
        self.config = config
        self.stopping = False
        self.stop_reason = None
        self.stop_message = ""
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.kvm = self.vm = self.memory = None
        self.vcpus, self.threads = [], []
        self.slots = Slots()
        self._ioloop = None
        self._attached = []
        self.pci_irqs = []      # (device number, pin, IOAPIC pin) for the MP table
        self._serial_out = None
        self._stuck_vcpus = []
        self.t_start = time.monotonic()
        self._pause_cond = threading.Condition()
        self.pause_requested = False
        self._parked = set()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------
    def _build(self):
        c = self.config
        if c.restore is not None:       # a snapshot: no kernel, state from the files
            from vmm import snapshot
            snapshot.build(self, c.restore)
            return
        if not 1 <= c.cpus <= mptable.MAX_CPUS:
            raise ValueError(f"--cpus must be between 1 and {mptable.MAX_CPUS}")
        template = cpuid.resolve(c.cpu_template)
        self.memory = GuestMemory(c.mem_size)
        kernel = loader.load_kernel(c.kernel, self.memory)
        initrd = boot.load_initrd(c.initrd, self.memory, kernel) if c.initrd else None
        self.kernel_image = kernel

        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        self.vm.setup_platform()
        self.vm.add_memory(self.memory, log_dirty=c.track_dirty_pages)
        if c.track_dirty_pages:
            self.memory.track_device_writes(True)

        self._add_legacy_devices()
        cmdline = " ".join(filter(None, [c.cmdline, cpuid.kernel_args(template)]))
        for dev in c.devices:          # devices may extend the command line
            self._attached.append(dev)
            cmdline = dev.attach(self, cmdline) or cmdline
        self.cmdline = cmdline
        zero_page = boot.write_zero_page(self.memory, kernel, cmdline, initrd)
        mptable.write(self.memory, c.cpus, pci_irqs=self.pci_irqs)
        regs.write_gdt(self.memory)
        regs.write_page_tables(self.memory)

        supported = self.kvm.supported_cpuid()
        for i in range(c.cpus):
            vcpu = Vcpu(self.vm, i)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid(cpuid.apply_template(supported, template, i, c.cpus))
            vcpu.set_msrs(regs.boot_msrs())
            regs.setup_lapic(vcpu)
            if i == 0:   # APs wait for INIT/SIPI from the guest via the in-kernel LAPIC
                regs.setup_sregs(vcpu)
                regs.setup_regs(vcpu, kernel.entry, zero_page)
                regs.setup_fpu(vcpu)

    def _add_legacy_devices(self):
        c = self.config
        out = c.serial_out if c.serial_out is not None else os.fdopen(os.dup(1), "wb", buffering=0)
        self._serial_out = out
        self.serial = Serial(out, irq=self._serial_irq)
        self.pio_bus.register(COM1_PORT, 8, self.serial)
        self.i8042 = I8042(lambda: self.stop("reset", "guest reset (i8042)"))
        self.pio_bus.register(DATA_PORT, 5, self.i8042)
        self.pvpanic = PvPanic(
            lambda ev: self.stop("panic", f"guest kernel panic (pvpanic event 0x{ev:x})"))
        self.pio_bus.register(PVPANIC_PORT, 1, self.pvpanic)

    def ioloop(self):
        """The I/O thread servicing device eventfds (created on first use)."""
        if self._ioloop is None:
            from vmm.virtio import IoLoop
            self._ioloop = IoLoop()
            self._ioloop.start()
        return self._ioloop

    def _serial_irq(self, level):
        vm = self.vm
        if vm is not None and not self.stopping:   # input can still arrive while we stop
            vm.set_irq_line(COM1_IRQ, level)

    # -- stopping ------------------------------------------------------------
    def stop(self, reason, message=""):
        """First reason wins; later ones (a reset after a panic) are ignored."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_message = reason, message
            self.stopping = True
        self._stop_event.set()
        with self._pause_cond:           # parked vCPUs see `stopping` at once
            self._pause_cond.notify_all()

    def check_power_off(self):
        if self.threads and all(t.halted_with_irqs_off for t in self.threads):
            self.stop("poweroff", "guest halted with interrupts off (power off)")

    # -- pausing (minimal; the control API's pause/resume builds on these) ---
    @property
    def paused(self):
        """True when every vCPU is out of KVM_RUN and parked and the I/O
        thread is stopped (or the machine was never started)."""
        with self._pause_cond:
            if not self.pause_requested:
                return not self.threads
            return all(t in self._parked or not t.is_alive() for t in self.threads)

    def pause(self, timeout=10.0):
        """Stop the vCPUs (each leaves KVM_RUN with its last exit completed,
        KVM API doc on immediate_exit), then let the I/O thread finish the
        handler in progress and stop it: no device work is half done."""
        with self._pause_cond:
            self.pause_requested = True
        for t in self.threads:
            t.kick()
        deadline = time.monotonic() + timeout
        with self._pause_cond:
            while not all(t in self._parked or not t.is_alive() for t in self.threads):
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    raise RuntimeError("vCPUs did not pause in time")
                self._pause_cond.wait(min(left, 0.05))
                for t in self.threads:
                    if t not in self._parked:
                        t.kick()
        if self._ioloop is not None:
            self._ioloop.stop(timeout=None)

    def resume(self):
        if self._ioloop is not None:
            self._ioloop.start()
        with self._pause_cond:
            self.pause_requested = False
            self._pause_cond.notify_all()

    def park(self, thread):
        """Called by a vCPU thread between KVM_RUNs: wait while paused."""
        with self._pause_cond:
            self._parked.add(thread)
            self._pause_cond.notify_all()
            while self.pause_requested and not self.stopping:
                self._pause_cond.wait(0.2)
            self._parked.discard(thread)

    # -- running -------------------------------------------------------------
    def run(self, start_paused=False):
        """Run until the guest stops; returns the exit status.  With
        `start_paused` the vCPUs wait for resume() (a restored VM)."""
        install_kick_handler()
        if start_paused:
            self.pause()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for vcpu in self.vcpus:
                t = VcpuThread(self, vcpu)
                self.threads.append(t)
            for t in self.threads:
                t.start()
            if self.config.restore is not None:     # bench/snapshot.py reads this line
                log.debug("restore: vCPUs running at %.6f (%.1f ms after Machine())",
                          time.time(), (time.monotonic() - self.t_start) * 1000)
            deadline = None if self.config.timeout is None else time.monotonic() + self.config.timeout
            while not self._stop_event.wait(POWER_OFF_POLL):
                if deadline is not None and time.monotonic() > deadline:
                    self.stop("timeout", f"timeout after {self.config.timeout:g} s")
                    break
                for t in self.threads:   # let each vCPU look at its halt state
                    t.kick()
        finally:
            self.stopping = True
            for t in self.threads:
                t.kick()
            for t in self.threads:
                t.join(timeout=5)
            # A vCPU thread can be stuck outside KVM_RUN (e.g. writing console
            # output to a pipe nobody reads); then guest RAM and kvm_run must
            # stay mapped, or that thread would fault when it resumes.
            self._stuck_vcpus = [t.name for t in self.threads if t.is_alive()]
            for s, h in old.items():
                signal.signal(s, h)
        return STATUS[self.stop_reason or "error"]

    def _on_signal(self, signum, frame):
        self.stop("signal", f"stopped by {signal.Signals(signum).name}")

    def close(self):
        """Release everything; safe to call more than once and after errors."""
        if self._ioloop is not None:
            # Wait for the handler in progress (a long fdatasync, say): the
            # devices below must not be closed under the I/O thread's feet.
            self._ioloop.stop(timeout=None)
        for dev in self._attached:      # flush and close disk images first
            try:
                dev.close()
            except Exception as e:
                log.error("closing %s: %s", dev, e)
        self._attached = []
        if self._ioloop is not None:
            self._ioloop.close()
            self._ioloop = None
        if self._serial_out is not None and self.config.serial_out is None:
            self._serial_out.close()    # our dup of stdout (a --serial file is the caller's)
        self._serial_out = None
        if self._stuck_vcpus:
            log.error("%s did not stop; leaving guest memory mapped", ", ".join(self._stuck_vcpus))
            return
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None


__all__ = ["Machine", "MachineConfig", "STATUS", "layout"]
