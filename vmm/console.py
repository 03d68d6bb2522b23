"""The serial console's input side: stdin (raw mode when it is a terminal)
fed to the UART by a thread, with QEMU's escape: Ctrl-a x quits, Ctrl-a
Ctrl-a sends a literal Ctrl-a."""
import os
import select
import sys
import threading
import time

ESCAPE = 0x01   # Ctrl-a
QUIT = ord("x")


class Console:
    def __init__(self, machine, fd=None, start=True):
        self.machine = machine
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.saved = None
        self.escape = False
        self.thread = None
        self._start = start     # False: start() later (pyvmm run: once the vCPUs run)
        self._started = False

    def __enter__(self):
        if self._start:
            self.start()
        return self

    def start(self):
        """Raw mode and the input thread (inside the `with`; once)."""
        if self._started:
            return
        self._started = True
        try:
            os.fstat(self.fd)
        except OSError:
            return                           # no stdin at all (CI): output only
        if os.isatty(self.fd):
            import termios                   # a terminal only (start-up, issue #16)
            import tty
            self.saved = termios.tcgetattr(self.fd)
            # TCSANOW, not setraw's default TCSAFLUSH: keys typed while the VMM
            # started (a restore is running within milliseconds) reach the guest
            # instead of being discarded, as QEMU's stdio does.
            tty.setraw(self.fd, termios.TCSANOW)
        self.thread = threading.Thread(target=self._pump, name="console", daemon=True)
        self.thread.start()

    def __exit__(self, *exc):
        if self.thread is not None:      # it sees machine.stopping within 0.2 s
            self.thread.join(timeout=1)
        if self.saved is not None:
            import termios                   # loaded by start(): no file is opened here
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        return False

    def filter(self, data):
        """Apply the escape sequence; returns the bytes for the guest."""
        out = bytearray()
        for b in data:
            if self.escape:
                self.escape = False
                if b == QUIT:
                    self.machine.stop("quit", "quit key")
                    break
                if b == ESCAPE:
                    out.append(b)
                continue
            if b == ESCAPE and self.saved is not None:
                self.escape = True
                continue
            out.append(b)
        return bytes(out)

    def _pump(self):
        if getattr(self.machine.config, "seccomp", False):
            from vmm import seccomp
            try:
                seccomp.apply("console")
            except Exception as e:
                self.machine.stop("error", str(e))
                return
        serial = self.machine.serial
        while not self.machine.stopping:
            if getattr(self.machine, "paused", False):
                time.sleep(0.05)             # a paused guest's UART takes nothing either
                continue
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if not r:
                continue
            try:
                data = os.read(self.fd, 64)
            except OSError:
                return
            if not data:
                return                       # EOF: nothing more to send
            data = self.filter(data)
            while data and not self.machine.stopping:
                room = serial.rx_space()
                if room:
                    serial.receive(data[:room])
                    data = data[room:]
                else:
                    time.sleep(0.01)         # the guest has not drained its FIFO yet
