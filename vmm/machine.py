"""A VM built from a MachineConfig: memory, vCPUs, boot state, devices and the
run loop.  `Machine(config).run()` returns the exit status (see STATUS)."""
from __future__ import annotations

import _signal as signal   # the C module: signal.py's enums are ~2 ms of start-up (issue #16)
import os
import threading
import time

from vmm.arch.x86 import boot, cpuid, layout, loader, mptable, regs
from vmm.bus import Bus
from vmm.devices import Slots
from vmm.hw.i8042 import DATA_PORT, I8042, KBD_IRQ
from vmm.hw.pvpanic import PVPANIC_PORT, PvPanic
from vmm.hw.serial import COM1_IRQ, COM1_PORT, Serial
from vmm.kvm.system import Kvm
from vmm.kvm.vcpu import Vcpu
from vmm.kvm.vm import Vm
from vmm.log import getLogger
from vmm.memory import GuestMemory
from vmm.record import Factory, Record
from vmm.vcpu_thread import VcpuThread, install_kick_handler

log = getLogger("pyvmm")   # vmm/log.py: logging loads only if a record is written

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

STOP_SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

POWER_OFF_POLL = 0.25 # seconds between checks for all vCPUs halted with IF=0
IO_STOP_TIMEOUT = 5.0 # seconds close() waits for the device I/O threads, all together


class MachineConfig(Record):
    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"
    mem_size: int = 256 << 20
    cpus: int = 1
    cpu_template: str = "auto"
    serial_out: object | None = None         # binary file object; None = stdout
    serial_in: int | None = None             # fd to read console input from
    timeout: float | None = None
    devices: list[object] = Factory(list)
    track_dirty_pages: bool = False          # KVM dirty log on, for diff snapshots
    restore: object | None = None            # a vmm.snapshot.Restore: build from a snapshot
    seccomp: bool = False      # confine every thread once built (vmm/seccomp.py); the CLI's default
    early: object | None = None   # a vmm.kvm.early.EarlyVm: the KVM VM, made ahead of time


def _on_thread(fn, name):
    """Start fn() on a thread; returns a callable that waits for it and
    raises what fn raised."""
    err = []

    def run():
        try:
            fn()
        except BaseException as e:      # re-raised by the caller's wait
            err.append(e)
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()

    def wait():
        t.join()
        if err:
            raise err[0]
    return wait


class Machine:
    def __init__(self, config):
        self.config = config
        self.stopping = False
        self.stop_reason = None
        self.stop_message = ""
        self._stop_event = threading.Event()
        # stop() runs in signal handlers too, on the main thread, possibly
        # while the main thread is inside stop() already: reentrant.
        self._lock = threading.RLock()
        self.run_gate = threading.Event()    # cleared by pause(): vCPUs park
        self.run_gate.set()
        self._pause_lock = threading.Lock()
        self._paused = False
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.kvm = self.vm = self.memory = None
        self.vcpus, self.threads = [], []
        self.slots = Slots()
        self._ioloops = []      # [(device spec, IoLoop)]: one I/O thread per device
        self._attaching = None  # the device spec whose attach() is running
        self._stuck_io = []     # device specs whose I/O thread did not stop
        self._attached = []
        self.pci_irqs = []      # (device number, pin, IOAPIC pin) for the MP table
        self._serial_out = None
        self._stuck_vcpus = []
        self.t_start = time.monotonic()
        self._pit = None        # waits for the PIT being made on a thread (_build)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------
    def _build(self):
        c = self.config
        if c.restore is not None:       # a snapshot: no kernel, state from the files
            if c.early is not None:     # it makes its own VM
                c.early.close()
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

        if c.early is not None:
            self.kvm, self.vm = c.early.take()
        else:
            self.kvm = Kvm()
            self.vm = Vm(self.kvm)
        # Memory before the irqchip and PIT, as Firecracker orders them: on this
        # host a memory slot added after them took 5-7 ms instead of 0.2-0.5
        # (VMs made in turn at low load; both orders wait in the kernel longer
        # under load).
        self.vm.add_memory(self.memory, log_dirty=c.track_dirty_pages)
        self.vm.setup_platform(pit=False)
        # The PIT's ioctl waits 1-3 ms for a kernel thread (issue #16, start-up):
        # it runs on a thread beside the devices and boot structures below, with
        # KVM's supported-CPUID query (also kernel time), and is waited for
        # before the vCPUs are made (KVM_CREATE_VCPU would wait for the VM's
        # lock it holds anyway).
        self._pit = _on_thread(lambda: (self.vm.create_pit(), self.kvm.supported_cpuid()),
                               "pyvmm-pit")
        if c.seccomp:   # the vCPU's filter, built meanwhile (not on its way to KVM_RUN; the
            from vmm import seccomp     # main and console threads build theirs once it runs)
            seccomp.build_quietly(("vcpu",))
        if c.track_dirty_pages:
            self.memory.track_device_writes(True)

        self._add_legacy_devices()
        cmdline = " ".join(filter(None, [c.cmdline, cpuid.kernel_args(template)]))
        for dev in c.devices:          # devices may extend the command line
            self._attached.append(dev)
            self._attaching = dev
            try:
                cmdline = dev.attach(self, cmdline) or cmdline
            finally:
                self._attaching = None
        self.cmdline = cmdline
        zero_page = boot.write_zero_page(self.memory, kernel, cmdline, initrd)
        mptable.write(self.memory, c.cpus, pci_irqs=self.pci_irqs)
        regs.write_gdt(self.memory)
        regs.write_page_tables(self.memory)

        pit, self._pit = self._pit, None
        pit()
        supported = self.kvm.supported_cpuid()      # read by the thread above: a copy
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
        self.i8042 = I8042(lambda: self.stop("reset", "guest reset (i8042)"), irq=self._kbd_irq)
        self.pio_bus.register(DATA_PORT, 5, self.i8042)
        self.pvpanic = PvPanic(
            lambda ev: self.stop("panic", f"guest kernel panic (pvpanic event 0x{ev:x})"))
        self.pio_bus.register(PVPANIC_PORT, 1, self.pvpanic)

    def ioloop(self):
        """The I/O thread servicing the eventfds of the device being attached
        (created on first use): one thread per device, as Cloud Hypervisor
        does, so a slow fdatasync or zeroing on one disk does not stall the
        other devices.  Outside an attach(), one shared loop."""
        key = self._attaching
        for owner, loop in self._ioloops:
            if owner is key:
                return loop
        from vmm.virtio import IoLoop
        loop = IoLoop(name=f"pyvmm-io{len(self._ioloops)}")
        self._ioloops.append((key, loop))
        loop.start()
        return loop

    def _kbd_irq(self):
        """IRQ 1, edge (the i8042 keyboard line)."""
        vm = self.vm
        if vm is not None and not self.stopping:
            vm.set_irq_line(KBD_IRQ, 1)
            vm.set_irq_line(KBD_IRQ, 0)

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
        self.run_gate.set()          # parked vCPUs see `stopping` and leave

    # -- pause / resume --------------------------------------------------------
    @property
    def paused(self):
        return self._paused

    def pause(self, timeout=5.0):
        """Stop the guest: every vCPU out of KVM_RUN and parked, then the I/O
        thread parked after the handler in progress.  Returns when nothing of
        the guest runs any more (guest memory and disks are then quiescent,
        as a snapshot needs).  Raises RuntimeError if a vCPU does not park."""
        with self._pause_lock:
            if self._paused or self.stopping:
                return
            self.run_gate.clear()
            self._paused = True
            deadline = time.monotonic() + timeout
            for t in self.threads:
                t.kick()
            for t in self.threads:
                # kick again until parked: a kick can land between two KVM_RUNs
                while not t.parked.wait(0.01):
                    if not t.is_alive() or self.stopping:
                        break
                    if time.monotonic() > deadline:
                        self.run_gate.set()
                        self._paused = False
                        raise RuntimeError(f"{t.name} did not pause in {timeout:g} s")
                    t.kick()
            for _, loop in self._ioloops:    # one I/O thread per device
                loop.pause(timeout=max(0.1, deadline - time.monotonic()))

    def resume(self):
        with self._pause_lock:
            if not self._paused:
                return
            for _, loop in self._ioloops:
                loop.resume()
            self._paused = False
            self.run_gate.set()

    # -- control-plane operations ----------------------------------------------
    def send_ctrl_alt_del(self):
        """Ctrl-Alt-Del through the i8042, as Firecracker does: the guest's
        keyboard driver (atkbd) gets the scancodes and init decides."""
        self.i8042.trigger_ctrl_alt_del()

    def check_power_off(self):
        if self.threads and all(t.halted_with_irqs_off for t in self.threads):
            self.stop("poweroff", "guest halted with interrupts off (power off)")

    # -- running -------------------------------------------------------------
    def run(self, start_paused=False, started=None):
        """Run until the guest stops; returns the exit status.  With
        `start_paused` the vCPUs wait for resume() (a restored VM).
        `started()` is called once the vCPU threads run, before the main
        thread's seccomp filter (threads it starts get their own filter)."""
        install_kick_handler()
        if start_paused:
            self.pause()
        old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            if self.config.seccomp:     # before any guest I/O can reach them
                from vmm import seccomp
                seccomp.enable()
                for _, loop in self._ioloops:
                    seccomp.apply_in(loop, "io")
            for vcpu in self.vcpus:
                t = VcpuThread(self, vcpu)
                self.threads.append(t)
            for t in self.threads:
                t.start()
            # The rest here (console, the main filter) waits until vCPU 0 is
            # about to enter KVM_RUN: it does not compete with it for the GIL
            # on the way to the guest's first instruction (bounded: a vCPU
            # thread that fails sets it too).
            if self.threads:
                self.threads[0].entering.wait(1.0)
            if started is not None:
                started()
            if self.config.restore is not None:     # bench/snapshot.py reads this line
                log.debug("restore: vCPUs running at %.6f (%.1f ms after Machine())",
                          time.time(), (time.monotonic() - self.t_start) * 1000)
            if self.config.seccomp:     # last: threads created later would inherit it
                seccomp.apply("main")
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
        self.stop("signal", f"stopped by {STOP_SIGNALS.get(signum, signum)}")

    def _stop_ioloops(self):
        """Stop every device I/O thread, waiting IO_STOP_TIMEOUT in all.  A
        handler can only be in one bounded batch of requests (device
        budgets), but one system call (fdatasync on a dead NFS server, say)
        can take forever: such a thread is reported and left, with its
        device open, as a stuck vCPU thread is."""
        self._stuck_io = []
        for _, loop in self._ioloops:
            loop.request_stop()
        deadline = time.monotonic() + IO_STOP_TIMEOUT
        for owner, loop in self._ioloops:
            if not loop.stop(timeout=max(0.0, deadline - time.monotonic())):
                self._stuck_io.append(owner)
                what = (getattr(owner, "path", None) or getattr(owner, "tap_name", None)
                        or type(owner).__name__)
                log.error("I/O thread %s (%s) did not stop; leaving its device open and "
                          "guest memory mapped", loop.name, what)

    def close(self):
        """Release everything; safe to call more than once and after errors."""
        if getattr(self, "_pit", None) is not None:   # an error came while the PIT was being made
            pit, self._pit = self._pit, None
            try:
                pit()
            except Exception:
                pass
        if self.config.early is not None:   # not taken (an error, or a snapshot's own VM)
            self.config.early.close()
        # The handler in progress must return before the devices below are
        # closed under the I/O thread's feet.
        self._stop_ioloops()
        stuck_shared = None in self._stuck_io
        left = []                       # devices of stuck I/O threads: a later close() retries
        for dev in self._attached:      # flush and close disk images first
            if stuck_shared or dev in self._stuck_io:
                left.append(dev)
                continue
            try:
                dev.close()
            except Exception as e:
                log.error("closing %s: %s", dev, e)
        self._attached = left
        for owner, loop in self._ioloops:
            if owner not in self._stuck_io:
                loop.close()
        self._ioloops = [(o, loop) for o, loop in self._ioloops if o in self._stuck_io]
        if self._serial_out is not None and self.config.serial_out is None:
            self._serial_out.close()    # our dup of stdout (a --serial file is the caller's)
        self._serial_out = None
        if self._stuck_vcpus:
            log.error("%s did not stop; leaving guest memory mapped", ", ".join(self._stuck_vcpus))
            return
        if self._stuck_io:          # its handler may touch guest memory when it resumes
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
