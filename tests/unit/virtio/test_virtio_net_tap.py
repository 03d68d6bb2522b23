"""The tap backend (vmm/tap.py) and virtio-net over a real tap, inside a
network namespace each test creates and always deletes: frames go between
the mock driver and an AF_PACKET socket on the tap, nowhere else."""
import errno
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from vmm import guest
from vmm.memory import GuestMemory, MiB
from vmm.testing.netns import NetNs, packet_socket
from vmm.tap import Tap, TapError, parse_mac
from vmm.testing.mocknet import HDR_LEN, RX, net_hdr
from vmm.testing.waiting import SLOW
from vmm.virtio.net import F_GUEST_CSUM, F_GUEST_TSO4, F_HOST_TSO4

from net_rig import NetRig

ETH_P = 0x88B5                     # IEEE local experimental ethertype
PEER_MAC = bytes.fromhex("020000000001")
TAP_MTU = 65521                    # the tap's largest MTU (65535 - Ethernet header)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun for a private network namespace")


@pytest.fixture
def ns():
    n = NetNs()
    try:
        yield n
    finally:
        n.delete()


def links(ns):
    return ns.ip("-o", "link", "show")


def test_created_tap_removed_on_close(ns):
    tap = ns.call(Tap, "pvt0")
    assert tap.created and not tap.persistent and "pvt0" in links(ns)
    assert ns.ip("-o", "addr", "show", "dev", "pvt0").count("inet") == 0   # nothing configured
    assert "UP" not in ns.ip("-o", "link", "show", "pvt0").split(">")[0]
    tap.close()
    assert "pvt0" not in links(ns)


def test_persistent_tap_is_left(ns):
    ns.ip("tuntap", "add", "dev", "pvt1", "mode", "tap")
    tap = ns.call(Tap, "pvt1")
    assert not tap.created and tap.persistent
    tap.close()
    assert "pvt1" in links(ns)


def test_busy_tap(ns):
    tap = ns.call(Tap, "pvt2")
    try:
        with pytest.raises(TapError) as e:
            ns.call(Tap, "pvt2")
        assert e.value.errno == errno.EBUSY and "busy" in str(e.value)
    finally:
        tap.close()


def test_not_a_tap(ns):
    with pytest.raises(TapError) as e:
        ns.call(Tap, "lo")
    assert "not a usable tap" in str(e.value)


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b"])
def test_bad_names(name):
    with pytest.raises(ValueError):
        Tap(name)


@pytest.mark.parametrize("text", ["52:54:00:12:34", "52:54:00:12:34:zz", "01:00:00:00:00:01",
                                  "00:00:00:00:00:00", "525400123456"])
def test_bad_macs(text):
    with pytest.raises(ValueError):
        parse_mac(text)


class TapRig:
    def __init__(self, ns, name="pvt3", **kw):
        self.ns = ns
        self.mem = GuestMemory(32 * MiB)
        self.tap = ns.call(Tap, name)
        ns.ip("link", "set", name, "mtu", str(TAP_MTU), "up")
        self.peer = ns.call(packet_socket, name, ETH_P)
        self.r = NetRig(self.mem, backend=self.tap, **kw)
        self.guest_mac = self.r.dev.mac

    def frame(self, n, src, dst):
        body = bytes((i * 7 + n) & 0xFF for i in range(n - 14))
        return dst + src + struct.pack("!H", ETH_P) + body

    def peer_recv(self, timeout=SLOW):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.peer.recv(1 << 17)
            except BlockingIOError:
                time.sleep(0.001)
        return None

    def close(self):
        self.r.close()                 # closes the tap
        self.peer.close()
        self.mem.close()


@pytest.fixture
def taprig(ns):
    made = []

    def make(**kw):
        t = TapRig(ns, **kw)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


SIZES = [60, 61, 100, 1514, 1515, 4096, 9000, 32768, 65535]    # Ethernet frame bytes


def test_tx_through_tap(taprig):
    t = taprig()
    d = t.r.d
    mark = d.mark()
    for n in SIZES:
        f = t.frame(n, t.guest_mac, PEER_MAC)
        d.send(f, split=1 + n % 13)
        assert d.sent()
        assert t.peer_recv() == f, n
        d.release(mark)
    assert t.r.dev.stats["tx_packets"] == len(SIZES)


def test_rx_through_tap(taprig):
    t = taprig()
    d = t.r.d
    mark = d.mark()
    for n in SIZES:
        f = t.frame(n, PEER_MAC, t.guest_mac)
        d.add_rx(HDR_LEN + 65550, split=1 + n % 17)
        t.peer.send(f)
        got, deadline = [], time.monotonic() + SLOW
        while not got and time.monotonic() < deadline:
            t.r.dev.poll_rx()
            got = [p for _, p in d.received(mrg=True) if p[12:14] == struct.pack("!H", ETH_P)]
        assert got == [f], n
        d.release(mark)
    assert t.r.dev.stats["rx_drops"] == 0


def test_rx_no_buffers_leaves_frames_in_tap(taprig):
    t = taprig()
    frames = [t.frame(100 + i, PEER_MAC, t.guest_mac) for i in range(5)]
    for f in frames:
        t.peer.send(f)
    t.r.dev.poll_rx()
    assert not t.r.dev.polling and t.r.dev.stats["rx_packets"] == 0
    for _ in range(20):
        t.r.d.add_rx(2048)
    t.r.d.kick(RX)
    got, deadline = [], time.monotonic() + SLOW
    while True:     # (the kernel may pass the last sends to the tap later: softirq)
        got += [p for _, p in t.r.d.received(mrg=True) if p[12:14] == struct.pack("!H", ETH_P)]
        if len(got) >= len(frames) or time.monotonic() > deadline:
            break
        time.sleep(0.005)
        t.r.dev.poll_rx()
    assert got == frames


def test_offloads_negotiated(taprig):
    t = taprig()
    f = t.r.d.features
    assert t.tap.offload_ok and f >> F_GUEST_CSUM & 1 and f >> F_GUEST_TSO4 & 1
    assert f >> F_HOST_TSO4 & 1
    # a UDP/IPv4 frame with its checksum left to the host (NEEDS_CSUM) is accepted
    udp = struct.pack("!HHHH", 40000, 9, 8 + 32, 0) + bytes(32)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([10, 77, 0, 2]), bytes([10, 77, 0, 1]))
    fr = PEER_MAC + t.guest_mac + b"\x08\x00" + ip + udp
    t.r.d.send(fr, hdr=net_hdr(flags=1, csum_start=34, csum_offset=6))
    st = t.r.dev.stats
    assert st["tx_packets"] == 1 and st["tx_errors"] == 0, (st, t.r.dev._net.last_errno)


# --- the command line: one clear line and a non-zero exit ---

def pyvmm(*args, ns=None):
    cmd = [sys.executable, "-m", "vmm", "run", "--kernel", guest.default_guest()[0],
           "--timeout", "20", *args]
    if ns is not None:
        cmd = ns.exec_cmd(cmd)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr


@pytest.mark.parametrize("spec,text", [
    ("tap=t0,mac=52:54:00:zz:00:01", "malformed MAC"),
    ("tap=t0,mac=01:54:00:00:00:01", "multicast"),
    ("mac=52:54:00:00:00:01", "tap=NAME is required"),
    ("tap=waytoolonginterfacename", "invalid interface name"),
    ("tap=t0,transport=usb", "unknown transport"),
])
def test_cli_bad_net_specs(spec, text):
    rc, err = pyvmm("--net", spec)
    assert rc == 2 and text in err and err.strip().count("\n") == 0, err


@pytest.mark.usefixtures("needs_kvm")
def test_cli_busy_tap(ns):
    if not os.path.exists(guest.default_guest()[0]):
        pytest.skip("default guest not built")
    tap = ns.call(Tap, "pvt4")
    try:
        rc, err = pyvmm("--net", "tap=pvt4", ns=ns)
    finally:
        tap.close()
    assert rc == 1 and "busy" in err and err.strip().count("\n") == 0, err


@pytest.mark.usefixtures("needs_kvm")
def test_cli_no_permission(ns):
    if shutil.which("setpriv") is None or not os.path.exists(guest.default_guest()[0]):
        pytest.skip("needs setpriv and the default guest")
    cmd = ns.exec_cmd(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                       sys.executable, "-m", "vmm", "run", "--kernel", guest.default_guest()[0],
                       "--timeout", "20", "--net", "tap=pvt5"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "permission denied" in p.stderr, p.stderr
    assert p.stderr.strip().count("\n") == 0
    assert "pvt5" not in links(ns)


def test_multi_queue_tap(ns):
    """queues=N opens N fds with IFF_MULTI_QUEUE; a detached queue gets no
    frames (TUNSETQUEUE), and every fd goes away on close."""
    tap = ns.call(Tap, "pvtmq", queues=3)
    try:
        assert len(tap.fds) == 3 and tap.fd == tap.fds[0] and tap.created
        from vmm.native import lib
        assert all(lib.pv_tap_getiff_flags(fd) & lib.IFF_MULTI_QUEUE for fd in tap.fds)
        tap.set_queue_enabled(1, False)
        tap.set_queue_enabled(2, False)
        tap.set_queue_enabled(2, False)          # twice: no error
        ns.ip("link", "set", "pvtmq", "up")
        s = ns.call(packet_socket, "pvtmq", ETH_P)
        try:
            frame = bytes(6 * [0xFF]) + PEER_MAC + struct.pack("!H", ETH_P) + b"mq" * 30
            for _ in range(8):
                s.send(frame)
            got, deadline = [0, 0, 0], time.monotonic() + SLOW
            while sum(got) < 8 and time.monotonic() < deadline:     # (softirq: maybe later)
                time.sleep(0.01)
                for i, fd in enumerate(tap.fds):
                    while True:
                        try:
                            os.read(fd, 4096)
                            got[i] += 1
                        except BlockingIOError:
                            break
            assert got == [8, 0, 0]          # only the attached queue reads frames
        finally:
            s.close()
        tap.set_queue_enabled(1, True)
    finally:
        tap.close()
    assert tap.fds == [] and "pvtmq" not in links(ns)
