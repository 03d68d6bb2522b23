import pytest

from vmm.bus import Bus, BusError


class Reg:
    def __init__(self):
        self.writes = []

    def read(self, off, size):
        return 0x1000 + off

    def write(self, off, size, value):
        self.writes.append((off, size, value))


def test_dispatch_by_range_and_offset():
    b, d1, d2 = Bus("t"), Reg(), Reg()
    b.register(0x100, 8, d1)
    b.register(0x200, 0x10, d2)
    assert b.read(0x103, 1) == 0x1003
    b.write(0x20F, 4, 7)
    assert d2.writes == [(0xF, 4, 7)] and d1.writes == []


def test_unhandled_counted_and_all_ones():
    b = Bus("t")
    b.register(0x100, 8, Reg())
    assert b.read(0x108, 2) == 0xFFFF
    b.write(0xFF, 1, 1)
    assert b.unhandled == 2


def test_overlap_rejected_and_unregister():
    b = Bus("t")
    b.register(0x100, 8, Reg())
    with pytest.raises(BusError):
        b.register(0x104, 8, Reg())
    with pytest.raises(BusError):
        b.register(0xF8, 9, Reg())
    b.unregister(0x100)
    b.register(0x104, 8, Reg())
