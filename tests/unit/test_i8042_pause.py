"""The i8042 (Firecracker's subset: control register, output port, buffer,
Ctrl-Alt-Del, reset) and the I/O loop's pause/resume, without KVM."""
import os
import threading
import time

import pytest

from vmm.hw.i8042 import (CMD_READ_CTR, CMD_READ_OUTP, CMD_RESET, CMD_WRITE_CTR, I8042,
                          I8042Error)
from vmm.testing.waiting import SLOW, until
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd

DATA, STATUS = 0, 4


def make():
    events = {"reset": 0, "irq": 0}
    dev = I8042(lambda: events.__setitem__("reset", events["reset"] + 1),
                irq=lambda: events.__setitem__("irq", events["irq"] + 1))
    return dev, events


def test_ctrl_alt_del_scancodes_and_interrupts():
    dev, ev = make()
    dev.trigger_ctrl_alt_del()
    got = []
    while dev.read(STATUS, 1) & 1:
        got.append(dev.read(DATA, 1))
    assert got == [0x14, 0x11, 0xE0, 0x71]
    assert ev["irq"] >= 4           # one per byte, as Firecracker's
    assert dev.read(DATA, 1) == 0   # empty buffer reads 0


def test_buffer_full_is_an_error_not_a_crash():
    dev, _ = make()
    for _ in range(4):
        dev.trigger_ctrl_alt_del()
    with pytest.raises(I8042Error):
        dev.trigger_ctrl_alt_del()


def test_control_register_output_port_and_keyboard_ack():
    dev, ev = make()
    dev.write(STATUS, 1, CMD_WRITE_CTR)
    dev.write(DATA, 1, 0x00)                       # keyboard interrupt off
    dev.write(STATUS, 1, CMD_READ_CTR)
    assert dev.read(DATA, 1) == 0x00
    before = ev["irq"]
    dev.trigger_ctrl_alt_del()
    assert ev["irq"] == before                     # masked by the guest
    dev.write(STATUS, 1, CMD_READ_OUTP)
    assert dev.read(DATA, 1) == 0x01
    dev.write(DATA, 1, 0xF4)                       # a keyboard command: acknowledged
    assert dev.read(DATA, 1) == 0xFA
    dev.write(STATUS, 1, CMD_RESET)
    assert ev["reset"] == 1
    dev.read(DATA, 2)                              # wrong size: counted, ignored
    assert dev.counts["missed_read_count"] == 1


def test_ioloop_pause_waits_for_the_handler_and_holds_events():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    ran = []
    started, gate = threading.Event(), threading.Event()

    def handler():
        drain_eventfd(fd)
        started.set()
        gate.wait(SLOW)
        ran.append(time.monotonic())

    with IoLoop() as loop:
        loop.add(fd, handler)
        signal_eventfd(fd)
        assert started.wait(SLOW)            # the handler is now running (blocked on gate)
        threading.Timer(0.3, gate.set).start()
        loop.pause(timeout=SLOW)
        # returned only after the handler in flight: the gate had to open first
        assert gate.is_set() and len(ran) == 1 and loop.paused
        signal_eventfd(fd)
        time.sleep(0.2)
        assert len(ran) == 1                      # nothing runs while paused
        loop.resume()
        assert until(lambda: len(ran) >= 2)
        assert len(ran) == 2                      # the held event is served after resume
    os.close(fd)


def test_ioloop_stop_while_paused():
    loop = IoLoop()
    loop.start()
    loop.pause()
    loop.close()
    assert not loop.running
