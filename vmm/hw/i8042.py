"""Just enough of the i8042 keyboard controller for Linux: the status port
reads idle, and the "pulse reset line" command (0xFE to port 0x64, what
`reboot=k` does) asks the VMM to stop the guest."""

DATA_PORT, COMMAND_PORT = 0x60, 0x64
CMD_RESET = 0xFE
CMD_READ_OUTPUT_PORT = 0xD0


class I8042:
    def __init__(self, on_reset):
        self.on_reset = on_reset
        self.outbuf = None

    def state(self):
        return {"outbuf": self.outbuf}

    def restore(self, st):
        v = st.get("outbuf")
        self.outbuf = None if v is None else int(v) & 0xFF

    def read(self, offset, size):
        if offset == COMMAND_PORT - DATA_PORT:
            return 0x01 if self.outbuf is not None else 0x00   # status: OBF only
        if offset == 0:
            value, self.outbuf = self.outbuf, None
            return 0 if value is None else value
        return 0xFF

    def write(self, offset, size, value):
        if offset == COMMAND_PORT - DATA_PORT:
            if value & 0xFF == CMD_RESET:
                self.on_reset()
            elif value & 0xFF == CMD_READ_OUTPUT_PORT:
                self.outbuf = 0x01                               # A20 on, no reset
