"""Issue #14 defects outside the data path: non-finite --timeout, fds
leaked on error paths, tracebacks reaching users, and the transport's
status vs. needs_reset race."""
import os
import threading

import pytest

from vmm import cli
from vmm.virtio import device as vd
from vmm.virtio.blk import BlkDevice
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.transport import Transport


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def kernel_file(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"x")
    return str(k)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "-nan"])
def test_timeout_must_be_finite_and_positive(tmp_path, value, capsys):
    rc = cli.main(["run", "--kernel", kernel_file(tmp_path), f"--timeout={value}"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE
    assert err.count("\n") == 1 and "--timeout must be a positive number" in err


def test_serial_file_not_leaked_when_a_device_spec_is_bad(tmp_path, capsys):
    before = open_fds()
    rc = cli.main(["run", "--kernel", kernel_file(tmp_path), "--serial",
                   f"file:{tmp_path / 'serial.log'}", "--drive", "nofile=x"])
    assert rc == cli.EXIT_USAGE and "--drive" in capsys.readouterr().err
    assert open_fds() == before
    assert not (tmp_path / "serial.log").exists()     # not even created


def test_unknown_exception_is_one_line_traceback_with_debug(tmp_path, monkeypatch, capsys):
    def boom(config):
        raise RuntimeError("something broke")
    monkeypatch.setattr(cli, "Machine", boom)
    k = kernel_file(tmp_path)
    assert cli.main(["run", "--kernel", k]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: something broke" in err
    assert cli.main(["run", "--kernel", k, "--debug"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("something broke")


def test_notify_eventfds_released_when_mmio_transport_fails(mem, image):
    """register_ioeventfd (KVM_IOEVENTFD) failing for a queue: the eventfds
    made so far are unregistered from the loop and closed."""
    dev = BlkDevice(image)
    loop = IoLoop()
    before = open_fds()

    def register(fd, off, n, datamatch):
        raise OSError(28, "No space left on device")
    try:
        with pytest.raises(OSError):
            VirtioMmio(dev, mem, ioloop=loop, register_ioeventfd=register)
        assert open_fds() == before
        assert loop._handlers == {}
    finally:
        dev.close()
        loop.close()


class _Dev(vd.VirtioDevice):
    queue_max_sizes = (8,)

    def activate(self, mem, queues, interrupt):
        pass

    def queue_notify(self, index):
        return False


def test_needs_reset_does_not_lose_a_concurrent_status_write(mem, monkeypatch):
    """needs_reset() on an I/O thread reads the status, a vCPU writes
    DRIVER bits meanwhile, needs_reset writes back: the vCPU's bits must not
    be lost (nor DEVICE_NEEDS_RESET)."""
    t = VirtioMmio(_Dev(), mem)
    t._write_status(vd.ACKNOWLEDGE)
    in_read, go_on = threading.Event(), threading.Event()
    io_thread = {}
    real = Transport.__dict__.get("status")

    class Spy:
        """`status` as a property: the I/O thread's read pauses until the
        vCPU's write had its chance."""
        def __get__(self, obj, owner=None):
            value = obj.__dict__["status"]
            if threading.get_ident() == io_thread.get("id"):
                in_read.set()
                go_on.wait(30)
            return value

        def __set__(self, obj, value):
            obj.__dict__["status"] = value
    assert real is None
    monkeypatch.setattr(VirtioMmio, "status", Spy(), raising=False)

    def io():
        io_thread["id"] = threading.get_ident()
        t.needs_reset("test")
    th = threading.Thread(target=io)
    th.start()
    assert in_read.wait(30)
    w = threading.Thread(target=t._write_status, args=(vd.ACKNOWLEDGE | vd.DRIVER,))
    w.start()
    w.join(0.2)         # with the fix it waits for needs_reset to finish
    go_on.set()
    th.join(30)
    w.join(30)
    st = t.status
    assert st & vd.DEVICE_NEEDS_RESET and st & vd.DRIVER, hex(st)
    t.close()


def test_handler_errors_are_one_line_traceback_only_at_debug(caplog):
    import logging
    import time
    from vmm.virtio.ioloop import signal_eventfd
    fd = os.eventfd(0, os.EFD_NONBLOCK)

    def handler():
        os.read(fd, 8)
        raise ValueError("bad thing")
    caplog.set_level(logging.DEBUG, logger="pyvmm")
    with IoLoop() as loop:
        loop.add(fd, handler)
        signal_eventfd(fd)
        deadline = time.monotonic() + 30
        while not loop.errors and time.monotonic() < deadline:
            time.sleep(0.01)
    os.close(fd)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "bad thing" in errors[0].getMessage()
    assert errors[0].exc_info is None                  # no traceback without --debug
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


def test_device_bug_is_one_line_and_needs_reset(mem, caplog):
    import logging

    class Buggy(_Dev):
        def queue_notify(self, index):
            raise KeyError("oops")
    t = VirtioMmio(Buggy(), mem)
    t.activated = True
    caplog.set_level(logging.WARNING, logger="pyvmm")
    t.notify(0)
    assert t.status & vd.DEVICE_NEEDS_RESET
    assert all(r.exc_info is None for r in caplog.records)
    assert any("internal error" in r.getMessage() for r in caplog.records)
    t.close()
