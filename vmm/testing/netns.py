"""Private network namespaces for tests and benchmarks: traffic stays inside.

    with NetNs() as ns:                  # `ip netns add pyvmm-test-<random>`
        tap = ns.call(Tap, "tap0")       # runs in a thread that joined the netns
        ns.ip("link", "set", "tap0", "up")
        rtts = ns.call(ping, "10.77.0.2", 5, 5.0)
    # deleted on every exit path (and ns.delete() is idempotent)

Anything a thread creates after setns(CLONE_NEWNET) (a tap, a socket) lives
in that namespace, whichever thread uses it later.
"""
import ctypes
import ctypes.util
import os
import secrets
import socket
import struct
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class NetNs:
    def __init__(self, prefix="pyvmm-test"):
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.path = f"/var/run/netns/{self.name}"
        try:
            self.call(_no_ipv6)     # no router solicitations or MLD on our taps
        except BaseException:
            self.delete()
            raise

    def ip(self, *args, check=True):
        """`ip -n NAME args...`; returns stdout."""
        p = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if check and p.returncode:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def exec_cmd(self, cmd):
        """A command line that runs `cmd` (a list) inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def call(self, fn, *args, **kw):
        """fn(*args) in a fresh thread that joined the namespace; returns its
        result or raises its exception."""
        out = {}

        def body():
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                out["value"] = fn(*args, **kw)
            except BaseException as e:   # handed to the caller
                out["error"] = e
        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def wait_link(self, name, timeout=30.0):
        """Wait until interface `name` exists in the namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ip("link", "show", name, check=False):
                return True
            time.sleep(0.1)
        return False

    def delete(self):
        if self.name is not None:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.name = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.delete()


def _no_ipv6():
    for which in ("all", "default"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{which}/disable_ipv6", "w") as f:
                f.write("1")
        except FileNotFoundError:       # a kernel without IPv6
            pass


def packet_socket(ifname, ethertype=0x0003):
    """A non-blocking AF_PACKET socket bound to `ifname` (call inside the netns)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(addr, count=5, timeout=5.0, interval=0.2):
    """ICMP echo to `addr` over a raw socket (call inside the netns): a list of
    round-trip times in seconds, one per reply (bounded: `count` requests,
    at most `timeout` seconds each)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = secrets.randbits(16)
    rtts = []
    try:
        for seq in range(count):
            payload = b"pyvmm-ping" + bytes(22)
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload
            t0 = time.monotonic()
            s.sendto(pkt, (addr, 0))
            while True:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    break
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0xF) * 4
                typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
                if src[0] == addr and typ == 0 and rid == ident and rseq == seq:
                    rtts.append(time.monotonic() - t0)
                    break
            time.sleep(interval)
    finally:
        s.close()
    return rtts
