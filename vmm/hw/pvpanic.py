"""pvpanic at ISA port 0x505 (QEMU's device, docs/specs/pvpanic.rst): reads
return the supported events, a guest write of PANICKED reports a panic."""

PVPANIC_PORT = 0x505
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1


class PvPanic:
    def __init__(self, on_event):
        self.on_event = on_event

    def state(self):
        return {}          # no registers: reads return a constant

    def restore(self, st):
        pass

    def read(self, offset, size):
        return PVPANIC_PANICKED | PVPANIC_CRASH_LOADED

    def write(self, offset, size, value):
        if value & (PVPANIC_PANICKED | PVPANIC_CRASH_LOADED):
            self.on_event(value)
