"""The vCPU run loop: one thread per vCPU, KVM_RUN until the machine stops,
port I/O and MMIO exits dispatched to the buses.

Other threads stop or poll a vCPU by setting `immediate_exit` and sending it
SIGUSR1 (KVM_RUN then returns EINTR); Python's own handler for the signal
does nothing but make that possible.
"""
import _signal as signal   # the C module: signal.py's enums are ~2 ms of start-up (issue #16)
import threading

from vmm.log import getLogger
from vmm.native import NativeError, lib

log = getLogger("pyvmm.vcpu")   # vmm/log.py: logging loads only if a record is written

KICK_SIGNAL = signal.SIGUSR1
RFLAGS_IF = 1 << 9


def install_kick_handler():
    """Must run on the main thread, before vCPU threads start."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread(threading.Thread):
    def __init__(self, machine, vcpu):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.machine = machine
        self.vcpu = vcpu
        self.exits = 0
        self.exit_counts = {"io_in": 0, "io_out": 0, "mmio_read": 0, "mmio_write": 0}
        self.halted_with_irqs_off = False
        self.parked = threading.Event()      # set while held out of KVM_RUN by a pause
        self.entering = threading.Event()    # set just before the first KVM_RUN (or on failure)

    def kick(self):
        """Make KVM_RUN return soon (EINTR) without losing guest state."""
        self.vcpu.run_struct.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def run(self):
        try:
            if getattr(self.machine.config, "seccomp", False):
                from vmm import seccomp
                seccomp.apply("vcpu")   # before the first KVM_RUN
            self._loop()
        except Exception as e:  # any VMM bug or KVM failure ends the machine plainly
            log.debug("vcpu%d failed", self.vcpu.index, exc_info=True)
            self.machine.stop("error", f"vcpu{self.vcpu.index}: {e}")
        finally:
            self.entering.set()

    def _loop(self):
        vcpu, machine = self.vcpu, self.machine
        run = vcpu.run_struct
        pio, mmio = machine.pio_bus, machine.mmio_bus
        tracer = getattr(machine, "exit_tracer", None)   # --trace-exits only
        if tracer is not None:
            from vmm.virtio.trace import TracedBus
            pio, mmio = TracedBus(pio, "pio", tracer), TracedBus(mmio, "mmio", tracer)
        EXIT_IO, EXIT_MMIO, EXIT_INTR = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_INTR
        IO_OUT = lib.KVM_EXIT_IO_OUT
        gate = machine.run_gate
        counts = self.exit_counts
        self.entering.set()
        while not machine.stopping:
            if not gate.is_set():
                self._park(gate)
                continue
            reason = vcpu.run()
            self.exits += 1
            if reason == EXIT_IO:
                io = run.io
                port, size, count = io.port, io.size, io.count
                if io.direction == IO_OUT:
                    counts["io_out"] += 1
                    data = vcpu.io_data()
                    for i in range(count):
                        pio.write(port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
                else:
                    counts["io_in"] += 1
                    vcpu.set_io_data(b"".join(pio.read(port, size).to_bytes(size, "little")
                                              for _ in range(count)))
            elif reason == EXIT_MMIO:
                m = run.mmio
                n = m.len
                if m.is_write:
                    counts["mmio_write"] += 1
                    mmio.write(m.phys_addr, n, int.from_bytes(vcpu.mmio_data(n), "little"))
                else:
                    counts["mmio_read"] += 1
                    vcpu.set_mmio_data(mmio.read(m.phys_addr, n).to_bytes(n, "little"))
            elif reason == EXIT_INTR:
                run.immediate_exit = 0
                self._check_halted()
            else:
                self._other_exit(reason)

    def _park(self, gate):
        """Machine.pause(): stay out of KVM_RUN (guest state untouched, kept in
        KVM) until the gate opens again or the machine stops."""
        self.parked.set()
        while not gate.wait(0.2) and not self.machine.stopping:
            pass
        self.vcpu.run_struct.immediate_exit = 0   # a kick that came while parked
        self.parked.clear()

    def _check_halted(self):
        """A vCPU halted with interrupts off will never run again: that is how
        a guest without ACPI powers off (`poweroff -f` ends in cli; hlt)."""
        if self.machine.stopping:
            return
        try:
            state = self.vcpu.get_mp_state()
            flags = self.vcpu.get_regs().rflags
        except NativeError:
            return
        halted = state in (lib.KVM_MP_STATE_HALTED, lib.KVM_MP_STATE_UNINITIALIZED)
        self.halted_with_irqs_off = halted and not flags & RFLAGS_IF
        self.machine.check_power_off()

    def _other_exit(self, reason):
        run, machine = self.vcpu.run_struct, self.machine
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == lib.KVM_SYSTEM_EVENT_CRASH:
                machine.stop("panic", "guest reported a crash (system event)")
            else:
                machine.stop("reset" if kind == lib.KVM_SYSTEM_EVENT_RESET else "poweroff",
                             "guest system event")
        elif reason == lib.KVM_EXIT_SHUTDOWN:
            machine.stop("crash", "guest triple fault (KVM_EXIT_SHUTDOWN)\n" + self.dump())
        elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = run.internal
            data = " ".join(f"0x{ie.data[i]:x}" for i in range(min(ie.ndata, 16)))
            what = {lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
                    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
                    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure"}.get(
                        ie.suberror, f"suberror {ie.suberror}")
            machine.stop("crash", f"KVM internal error: {what} [{data}]\n" + self.dump())
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            machine.stop("crash", "KVM entry failure, hardware reason "
                         f"0x{run.fail_entry.hardware_entry_failure_reason:x}\n" + self.dump())
        elif reason == lib.KVM_EXIT_HLT:
            pass   # only without an in-kernel LAPIC; nothing to do
        else:
            machine.stop("crash", f"unexpected KVM exit reason {reason}\n" + self.dump())

    def dump(self):
        """Readable register dump for a crash report."""
        try:
            r, s = self.vcpu.get_regs(), self.vcpu.get_sregs()
        except NativeError as e:
            return f"  (registers unavailable: {e})"
        gp = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
        lines = [f"  vcpu{self.vcpu.index}: rip=0x{r.rip:016x} rflags=0x{r.rflags:x}"]
        for i in range(0, 16, 4):
            lines.append("  " + " ".join(f"{n:>3}=0x{getattr(r, n):016x}" for n in gp[i:i + 4]))
        lines.append(f"  cr0=0x{s.cr0:x} cr2=0x{s.cr2:x} cr3=0x{s.cr3:x} cr4=0x{s.cr4:x} "
                     f"efer=0x{s.efer:x}")
        lines.append(f"  cs=0x{s.cs.selector:x} (base 0x{s.cs.base:x} l={s.cs.l} dpl={s.cs.dpl}) "
                     f"ss=0x{s.ss.selector:x} gdt=0x{s.gdt.base:x}/{s.gdt.limit} "
                     f"idt=0x{s.idt.base:x}/{s.idt.limit}")
        return "\n".join(lines)
