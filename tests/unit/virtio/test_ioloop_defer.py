"""IoLoop.defer: work a handler hands to "just before the I/O thread sleeps"
(transports raise their interrupts that way), and the transports' use of it."""
import os
import threading

from vmm.virtio.blk import BlkDevice
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd
from vmm.virtio.pci_legacy import VirtioPciLegacy


def test_defer_runs_once_per_key_after_the_handlers_and_not_off_thread():
    log, done = [], threading.Event()
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    with IoLoop() as loop:
        assert loop.defer("k", lambda: log.append("off")) is False    # not the loop's thread

        def handler():
            drain_eventfd(fd)
            for i in range(3):
                assert loop.defer("irq", lambda i=i: log.append(("irq", i)))
            log.append("handler")
            loop.defer("done", done.set)
        loop.add(fd, handler)
        signal_eventfd(fd)
        assert done.wait(30)
    os.close(fd)
    assert log == ["handler", ("irq", 0)]          # after the handler, the first of the key


def test_deferred_work_runs_before_a_stop():
    ran, deferred = threading.Event(), threading.Event()
    loop = IoLoop()
    loop.start()
    loop.pause()                    # the thread parks with nothing left to run
    loop.call_soon(lambda: loop.defer("x", ran.set) and deferred.set())
    loop.resume()
    assert deferred.wait(30)
    assert loop.stop()
    assert ran.is_set()
    loop.close()


def test_level_line_not_raised_once_isr_was_acknowledged(mem, image):
    """A deferred INTx raise finds ISR 0 (the driver polled and acked
    meanwhile): the line must stay down (a level line up with ISR 0 would
    fire forever)."""
    lines = []
    t = VirtioPciLegacy(BlkDevice(image), mem, irq_line=lines.append)
    try:
        t.interrupt_status = 0
        t._raise_deferred()
        assert 1 not in lines
        t.interrupt_status = 1
        t._raise_deferred()
        assert lines[-1] == 1
    finally:
        t.close()
