"""virtio-vsock end to end with the default guest (restored at its shell from
the session snapshot, conftest.py, which has a vsock device with guest CID 3;
the shell runs what `pyvmm.test=vsock` runs at boot: guests/src/vsock.c): the guest connects out to a host listener
(`uds_6000`) and gets its reply; it sends 1,000,000 bytes to `uds_6001` and
closes at once, and the host reads exactly those bytes then a clean EOF;
the host sends 16 MiB to the guest's echo server through `CONNECT 5000` and
gets the same bytes back (SHA-256); a host that closes mid-stream gives the
guest's echo server a clean close, and the server still answers after."""
import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from vmm.machine import STATUS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

TIMEOUT = 1200          # s; the 16 MiB echo runs through the emulated guest kernel
SIZE = 16 << 20


def serve_once(listener, handler):
    def run():
        c, _ = listener.accept()
        with c:
            handler(c)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def host_connect(uds, port, timeout=60):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        assert b, f"closed before OK (got {line!r})"
        line += b
    assert line.startswith(b"OK "), line
    return s


@pytest.mark.slow(35)
def test_vsock_with_default_guest(restored, tmp_path):
    uds = str(tmp_path / "v.sock")
    results = {}

    reply = socket.socket(socket.AF_UNIX)                 # guest-initiated: answers
    reply.bind(f"{uds}_6000")
    reply.listen(1)

    def answer(c):
        c.settimeout(TIMEOUT)
        data = b""
        while True:
            b = c.recv(4096)
            if not b:
                break
            data += b
        results["from_guest"] = data
        c.sendall(b"hello-from-host:" + data)

    sink = socket.socket(socket.AF_UNIX)                  # guest-initiated: closes mid-way
    sink.bind(f"{uds}_6001")
    sink.listen(1)

    def drain(c):
        c.settimeout(TIMEOUT)
        h, n = hashlib.sha256(), 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        results["blast"] = (n, h.hexdigest())

    t1 = serve_once(reply, answer)
    t2 = serve_once(sink, drain)
    r = restored(vsock=uds)
    p, console = r.p, r.console
    try:
        # guests/initramfs/etc/rc, pyvmm.test=vsock (the marker computed, so
        # the shell's echo of the typed line does not match it)
        r.type("vsock echo 5000 & vsock connect 2 6000 hello-from-guest; "
               "vsock blast 2 6001 1000000; echo \"pyvmm-guest: vsock $((1+1))-ready\"\n")
        assert console.wait(b"pyvmm-guest: vsock 2-ready", TIMEOUT - 120), console.text[-3000:]
        assert b"vsock-connect: reply [hello-from-host:hello-from-guest]" in console.buf
        t1.join(120)
        t2.join(120)
        assert results["from_guest"] == b"hello-from-guest"
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(65536))
        expect = hashlib.sha256(pattern * (1000000 // 65536) + pattern[:1000000 % 65536])
        assert results["blast"] == (1000000, expect.hexdigest())

        # host -> guest echo, 16 MiB, checksummed
        s = host_connect(uds, 5000)
        s.settimeout(TIMEOUT)
        data = os.urandom(SIZE)
        back = hashlib.sha256()
        got = [0]

        def reader():
            while True:
                b = s.recv(1 << 16)
                if not b:
                    return
                back.update(b)
                got[0] += len(b)
        rt = threading.Thread(target=reader, daemon=True)
        t0 = time.monotonic()
        rt.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        rt.join(TIMEOUT)
        dt = time.monotonic() - t0
        s.close()
        print(f"16 MiB echoed in {dt:.1f} s ({2 * SIZE / dt / 1e6:.1f} MB/s both ways)")
        assert got[0] == SIZE and back.hexdigest() == hashlib.sha256(data).hexdigest()
        assert console.wait(b"port 5000: %d bytes echoed, closed (eof)" % SIZE, 60)

        # the host closes mid-stream: the guest's server sees the end, no hang
        s = host_connect(uds, 5000)
        s.sendall(os.urandom(300_000))
        s.close()
        assert console.wait(b"vsock-echo: port 5000: ", 60)
        before = console.buf.count(b"vsock-echo: port 5000: ")
        deadline = time.monotonic() + 60
        while console.buf.count(b"vsock-echo: port 5000: ") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert console.buf.count(b"vsock-echo: port 5000: ") >= 2, console.text[-2000:]
        # ... and still serves
        s = host_connect(uds, 5000)
        s.sendall(b"again")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"again"
        s.close()

        # a port nobody listens on: the guest refuses (RST), the host socket closes
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(uds)
        s.sendall(b"CONNECT 4444\n")
        assert s.recv(100) == b""
        s.close()

        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        err = p.stderr.read().decode(errors="replace")
        assert rc == STATUS["signal"], err
        assert "Traceback" not in err
        assert not os.path.exists(uds)                    # removed on exit
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
        reply.close()
        sink.close()
