"""virtio-net on virtio-mmio, end to end: the default guest kernel configures
eth0 from `ip=` on its command line, and a private network namespace pings
it through the tap (the guest kernel answers ARP and ICMP itself, so both
directions of the device are exercised without guest user space).  The VMM
runs inside the namespace; nothing leaves it, and it is deleted on every
outcome."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from vmm import guest
from vmm.machine import STATUS
from vmm.testing.netns import NetNs, ping

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm"),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for a network namespace")]

TIMEOUT = 300
BASE = "console=ttyS0 reboot=k panic=-1 pvpanic_mmio.ioport=0x505 rodata=off 8250.nr_uarts=1 nopti"
GUEST_IP, HOST_IP = "10.77.0.2", "10.77.0.1"
TAP = "pvtap0"


class Console:
    """Collects a process's stdout on a thread; wait() for a marker."""

    def __init__(self, stream):
        self.buf = b""
        self.cond = threading.Condition()
        self.t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.t.start()

    def _read(self, stream):
        while True:
            chunk = os.read(stream.fileno(), 4096)
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.buf += chunk
                self.cond.notify_all()

    def wait(self, marker, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while marker not in self.buf and not getattr(self, "eof", False):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return marker in self.buf

    @property
    def text(self):
        return self.buf.decode(errors="replace")


@pytest.mark.parametrize("transport", ["mmio", "pci-legacy"])
def test_ping_guest_through_tap(transport):
    kernel, initrd = guest.default_guest()
    if not os.path.exists(kernel):
        pytest.fail("default guest not built: run `make guest`")
    cmdline = f"{BASE} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    ns = NetNs()
    p = None
    try:
        p = subprocess.Popen(
            ns.exec_cmd([sys.executable, "-m", "vmm", "run", "--kernel", kernel, "--initrd", initrd,
                         "--net", f"tap={TAP},mac=52:54:00:77:00:02,transport={transport}", "--cmdline", cmdline,
                         "--timeout", str(TIMEOUT)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        console = Console(p.stdout)
        assert ns.wait_link(TAP, 60), "the VMM did not create the tap"
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        ok = console.wait(b"IP-Config: Complete", TIMEOUT - 30)
        assert ok, console.text[-3000:]
        # the kernel's next line: "device=eth0, hwaddr=..., ipaddr=10.77.0.2, ..."
        assert console.wait(f"ipaddr={GUEST_IP}".encode(), 60), console.text[-2000:]
        rtts = ns.call(ping, GUEST_IP, 5, 5.0)
        print(f"ping {GUEST_IP}: {len(rtts)}/5 replies, rtt ms: "
              + ", ".join(f"{r * 1000:.1f}" for r in rtts))
        assert len(rtts) >= 3, f"{len(rtts)}/5 ping replies"
        arp = ns.ip("neigh", "show", "dev", TAP)
        assert "52:54:00:77:00:02" in arp, arp
        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        err = p.stderr.read().decode(errors="replace")
        assert rc == STATUS["signal"], err
        assert not ns.ip("link", "show", TAP, check=False)   # the tap we created is gone
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(30)
        ns.delete()
