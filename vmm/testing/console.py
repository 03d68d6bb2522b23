"""A VMM's serial console as the tests see it: its stdout read on a thread
into one buffer, waited on for markers, and its stdin to type commands at the
guest's shell.  (The VMM's own console handling is vmm/console.py.)"""
import os
import threading
import time


class ConsoleReader:
    """`ConsoleReader(proc)` (a Popen with stdout, and stdin to type) or
    `ConsoleReader(stream)` (read only)."""

    def __init__(self, out, stdin=None):
        if hasattr(out, "stdout"):
            out, stdin = out.stdout, out.stdin
        self.stdin = stdin
        self.buf = b""
        self.pos = 0                  # end of the last expect() match
        self.eof = False
        self.cond = threading.Condition()
        self._fd = out.fileno()
        self.thread = threading.Thread(target=self._read, args=(out.fileno(),), daemon=True)
        self.thread.start()

    def _read(self, fd):
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            with self.cond:
                if chunk:
                    self.buf += chunk
                else:
                    self.eof = True
                self.cond.notify_all()
            if not chunk:
                return

    def _find(self, marker, start, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.buf.find(marker, start)
                if i >= 0 or self.eof:
                    return i
                left = deadline - time.monotonic()
                if left <= 0:
                    return -1
                self.cond.wait(left)

    def wait(self, marker, timeout, start=0):
        """True once `marker` (bytes) is in the output from offset `start`;
        False at the timeout or when the VMM closed its output without it."""
        return self._find(marker, start, timeout) >= 0

    def expect(self, marker, timeout):
        """wait() for `marker` after the previous expect()'s match."""
        i = self._find(marker, self.pos, timeout)
        if i < 0:
            return False
        self.pos = i + len(marker)
        return True

    def caught_up(self, quiet=0.3, timeout=60):
        """len(buf) once everything the VMM already wrote has been read: its
        pipe is empty and nothing arrived for `quiet` seconds.  Take this,
        not len(buf), after pausing a guest: this reader thread may lag
        behind the VMM on a loaded host.  (A guest that keeps writing makes
        it time out; the caller's check of what came next then fails.)"""
        import fcntl
        import termios
        avail = bytearray(4)
        end = time.monotonic() + timeout
        n, since = -1, time.monotonic()
        while time.monotonic() < end and not self.eof:
            try:
                fcntl.ioctl(self._fd, termios.FIONREAD, avail)
            except OSError:
                break
            now = time.monotonic()
            if int.from_bytes(avail, "little") or len(self.buf) != n:
                n, since = len(self.buf), now
            elif now - since >= quiet:
                break
            time.sleep(0.05)
        return len(self.buf)

    def send(self, line):
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def run(self, cmd, marker, timeout=300):
        """Run a shell command; returns the console text from the command on
        (the marker is echoed computed, so the typed line does not match)."""
        start = len(self.buf)
        self.send(f"{cmd}; echo {marker}-$((40+2))")
        assert self.wait(f"{marker}-42".encode(), timeout, start), self.text[-2000:]
        return self.buf[start:].decode(errors="replace")

    @property
    def text(self):
        return self.buf.decode(errors="replace")
