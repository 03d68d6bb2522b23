"""Just enough of the i8042 keyboard controller for Linux (the same subset
Firecracker emulates): the status and control registers, the output port,
a 16-byte output buffer, the "pulse reset line" command (0xFE to port 0x64,
what `reboot=k` does, which asks the VMM to stop the guest), and key presses
injected by the VMM (Ctrl-Alt-Del, scancode set 2) announced on IRQ 1.
Keyboard commands written to port 0x60 are simply acknowledged (0xFA)."""
import threading

DATA_PORT, COMMAND_PORT = 0x60, 0x64
KBD_IRQ = 1

CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_READ_OUTP, CMD_WRITE_OUTP = 0xD0, 0xD1
CMD_RESET = 0xFE

SB_OUT_DATA_AVAIL = 1 << 0
SB_CMD_DATA = 1 << 3           # a command parameter is expected at port 0x60
SB_KBD_ENABLED = 1 << 4
CB_KBD_INT = 1 << 0            # control register: keyboard interrupt enabled
CB_POST_OK = 1 << 2

KEY_CTRL, KEY_ALT, KEY_DEL = 0x0014, 0x0011, 0xE071     # set 2 make codes
BUF_SIZE = 16
ACK = 0xFA


class I8042Error(Exception):
    pass


class I8042:
    def __init__(self, on_reset, irq=None):
        self.on_reset = on_reset
        self.irq = irq or (lambda: None)
        self.status = SB_KBD_ENABLED
        self.control = CB_POST_OK | CB_KBD_INT
        self.outp = 0x01                         # A20 on, no reset
        self.cmd = 0
        self.buf = bytearray()
        self.lock = threading.Lock()             # vCPU threads vs. the control API
        self.counts = {"read_count": 0, "write_count": 0, "reset_count": 0,
                       "missed_read_count": 0, "missed_write_count": 0}

    # -- buffer ----------------------------------------------------------------
    def _push(self, byte):
        if len(self.buf) >= BUF_SIZE:
            raise I8042Error("i8042 buffer full")
        self.buf.append(byte)
        self.status |= SB_OUT_DATA_AVAIL

    def _flush(self):
        self.buf.clear()
        self.status &= ~SB_OUT_DATA_AVAIL

    def _interrupt(self):
        if self.control & CB_KBD_INT:
            self.irq()

    def trigger_ctrl_alt_del(self):
        """Queue Ctrl, Alt, Del (4 bytes) and raise IRQ 1; raises I8042Error if
        the guest has not drained earlier keys."""
        with self.lock:
            if BUF_SIZE - len(self.buf) < 4:
                raise I8042Error("i8042 buffer full (the guest is not reading its keyboard)")
            for key in (KEY_CTRL, KEY_ALT, KEY_DEL):
                if key > 0xFF:
                    self._push(key >> 8)
                self._push(key & 0xFF)
        self._interrupt()

    # -- port I/O ----------------------------------------------------------------
    def read(self, offset, size):
        if size != 1:
            self.counts["missed_read_count"] += 1
            return 0xFF
        if offset == COMMAND_PORT - DATA_PORT:
            self.counts["read_count"] += 1
            return self.status
        if offset == 0:
            self.counts["read_count"] += 1
            with self.lock:
                value = self.buf.pop(0) if self.buf else 0
                more = bool(self.buf)
                if not more:
                    self.status &= ~SB_OUT_DATA_AVAIL
            if more:
                self._interrupt()               # one interrupt per byte
            return value
        self.counts["missed_read_count"] += 1
        return 0xFF

    def write(self, offset, size, value):
        value &= 0xFF
        if size != 1 or offset not in (0, COMMAND_PORT - DATA_PORT):
            self.counts["missed_write_count"] += 1
            return
        self.counts["write_count"] += 1
        irq = False
        with self.lock:
            if offset == COMMAND_PORT - DATA_PORT:
                if value == CMD_RESET:
                    self.counts["reset_count"] += 1
                    reset = True
                else:
                    reset = False
                    if value == CMD_READ_CTR:
                        self._flush()
                        self._push(self.control)
                    elif value == CMD_READ_OUTP:
                        self._flush()
                        self._push(self.outp)
                    elif value in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
                        self._flush()
                        self.status |= SB_CMD_DATA
                        self.cmd = value
            else:
                reset = False
                if self.status & SB_CMD_DATA:
                    if self.cmd == CMD_WRITE_CTR:
                        self.control = value
                    elif self.cmd == CMD_WRITE_OUTP:
                        self.outp = value
                    self.status &= ~SB_CMD_DATA
                else:                            # a command for the keyboard itself
                    self._flush()
                    self._push(ACK)
                    irq = True
        if reset:
            self.on_reset()
        if irq:
            self._interrupt()
