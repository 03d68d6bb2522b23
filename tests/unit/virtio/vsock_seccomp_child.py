"""Run by test_virtio_vsock.py in a child process: a VsockDevice whose queue
notifications and host sockets are all serviced by an IoLoop thread
confined with the "io" seccomp filter; every vsock path is exercised.  A
system call missing from the allow-list kills this process with SIGSYS."""
import os
import socket
import sys
import tempfile
import time

from vmm import seccomp
from vmm.memory import GuestMemory, MiB
from vmm.testing.mockvsock import (OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUT_RCV,
                                   SHUT_SEND, GuestStream, VsockDriver, dispatch)
from vmm.virtio import vsock_mux
from vmm.virtio.ioloop import IoLoop, signal_eventfd
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.vsock import VsockDevice


def wait_packets(d, streams, pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rest = dispatch(d.received(), streams)
        if pred(rest):
            return rest
        time.sleep(0.01)
    raise SystemExit("timed out")


def main():
    # (read at each host CONNECT: long while the driver must answer in time,
    # short for the one meant to time out; two threads on a loaded host can
    # take more than 0.2 s to answer)
    vsock_mux.CONNECT_TIMEOUT = 60
    tmp = tempfile.mkdtemp()
    uds = os.path.join(tmp, "v.sock")
    loop = IoLoop()
    loop.start()
    mem = GuestMemory(32 * MiB)
    dev = VsockDevice(uds, ioloop=loop)
    fds = {}
    t = VirtioMmio(dev, mem, ioloop=loop,
                   register_ioeventfd=lambda fd, off, n, index: fds.__setitem__(index, fd))
    d = VsockDriver(t, mem, arena_size=24 << 20)
    d.kick = lambda q=0: signal_eventfd(fds[q])       # as KVM's ioeventfd would
    assert d.init()
    seccomp.enable()
    seccomp.apply_in(loop, "io")
    # guest-initiated, data both ways, half-close, close
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_52")
    lst.listen(1)
    g = GuestStream(d, 1000, 52)
    g.send_op(OP_REQUEST)
    wait_packets(d, {1000: g}, lambda rest: g.ctl)
    hs, _ = lst.accept()
    g.write(b"up")
    assert hs.recv(10) == b"up"
    hs.sendall(b"down")
    wait_packets(d, {1000: g}, lambda rest: g.inbox)
    g.send_op(OP_SHUTDOWN, flags=SHUT_SEND)
    assert hs.recv(10) == b""
    g.send_op(OP_SHUTDOWN, flags=SHUT_RCV | SHUT_SEND)
    wait_packets(d, {1000: g}, lambda rest: g.ctl[-1].op == OP_RST)
    # host-initiated, a refused one, garbage, a timed-out one
    h = socket.socket(socket.AF_UNIX)
    h.connect(uds)
    h.sendall(b"CONNECT 80\n")
    rest = wait_packets(d, {}, lambda rest: rest)
    d.packet(80, rest[0].src_port, OP_RESPONSE, buf_alloc=4096)
    h.settimeout(30)
    assert h.recv(64).startswith(b"OK ")
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(uds)
    bad.sendall(b"HELLO\n")
    bad.settimeout(30)
    assert bad.recv(10) == b""
    vsock_mux.CONNECT_TIMEOUT = 0.2
    late = socket.socket(socket.AF_UNIX)
    late.connect(uds)
    late.sendall(b"CONNECT 81\n")
    late.settimeout(30)
    assert late.recv(10) == b""                      # the connect timeout
    d.packet(9, 9, OP_REQUEST)                       # nobody listens: RST
    wait_packets(d, {}, lambda rest: any(p.op == OP_RST for p in rest))
    dev.transport_reset()
    print("OK", dev.counters(), flush=True)
    os._exit(0)                                      # no teardown under the filter


if __name__ == "__main__":
    sys.exit(main())
