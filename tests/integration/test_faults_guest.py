"""Fault injection, tracing and virtio-rng end to end, in ONE boot of the
default guest (driven over its serial console): a disk with an injected bad
range (the guest's kernel log names exactly that sector, other reads
succeed), the entropy device (rng_current names virtio_rng, /dev/hwrng gives
4 KiB), a NIC dropping 30% of the frames to the guest (a ping from a private
network namespace loses some replies, not all) recorded to a pcap file
(parsed: ICMP both ways), and a NIC whose link starts down (the guest sees
no carrier).  Plus --trace-exits on a tiny guest (milliseconds)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from vmm import guest
from vmm.testing.netns import NetNs, ping
import vmm.testing.tinyguest as T
from vmm.virtio.trace import read_pcap
from vmm.testing.console import ConsoleReader

TIMEOUT = 1200
BASE = ("console=ttyS0 reboot=k panic=-1 pvpanic_mmio.ioport=0x505 rodata=off 8250.nr_uarts=1 nopti "
        "i8042.noaux i8042.nokbd")
GUEST_IP, HOST_IP = "10.78.0.2", "10.78.0.1"
TAP, TAP2 = "pvflt0", "pvflt1"
BAD = 2048                      # first injected bad sector (8 sectors: one 4 KiB block)

needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for a network namespace")


def shell(p, console, cmd, timeout=120):
    """Run `cmd` on the guest's serial shell; its output (the end marker is
    typed split in two so the echoed command line never matches it)."""
    start = len(console.buf)
    p.stdin.write((cmd + '; echo "@@""END@@"\n').encode())
    p.stdin.flush()
    assert console.wait(b"@@END@@", timeout, start), console.text[-3000:]
    return console.buf[start:].decode(errors="replace").split("@@END@@")[0]


@pytest.mark.integration
@pytest.mark.usefixtures("needs_kvm")
@needs_netns
def test_faults_rng_pcap_one_boot(tmp_path):
    kernel, initrd = guest.default_guest()
    if not os.path.exists(kernel):
        pytest.fail("default guest not built: run `make guest`")
    img = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    img.write_bytes(data)
    pcap = tmp_path / "net.pcap"
    sock = str(tmp_path / "api.sock")
    trace = tmp_path / "disk.jsonl"
    cmdline = f"{BASE} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    ns = NetNs()
    p = None
    try:
        p = subprocess.Popen(ns.exec_cmd([
            sys.executable, "-m", "vmm", "run", "--kernel", kernel, "--initrd", initrd,
            "--cmdline", cmdline, "--timeout", str(TIMEOUT), "--rng",
            "--drive", f"file={img},faults=read-error@{BAD}-{BAD + 7};seed=1,trace={trace}",
            "--net", f"tap={TAP},mac=52:54:00:78:00:02,faults=rx.drop=30%;seed=4,pcap={pcap}",
            "--net", f"tap={TAP2},faults=link=down", "--api-sock", sock]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
        console = ConsoleReader(p.stdout)
        assert ns.wait_link(TAP, 60), "the VMM did not create the tap"
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        assert console.wait(b"shell ready", TIMEOUT - 60), console.text[-3000:]

        # disk: the bad block fails with the kernel naming its sector; others read fine
        out = shell(p, console, f"dd if=/dev/vda of=/dev/null bs=512 skip={BAD} count=1 "
                                f"iflag=direct; echo BAD-RC=$?")
        assert "BAD-RC=1" in out.replace("BAD-RC=$?", ""), out
        out = shell(p, console, "dmesg > /tmp/kmsg; grep 'I/O error' /tmp/kmsg")
        assert f"I/O error, dev vda, sector {BAD} op 0x0:(READ)" in out, out
        good = 100
        out = shell(p, console, f"dd if=/dev/vda bs=512 skip={good} count=8 iflag=direct "
                                f"2>/dev/null | md5sum")
        assert hashlib.md5(data[good * 512:(good + 8) * 512]).hexdigest() in out, out

        # rng
        out = shell(p, console, "cat /sys/class/misc/hw_random/rng_current; "
                                "dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | wc -c")
        assert "virtio_rng" in out and "4096" in out, out

        # the second NIC started with its link down; the API switches it up and down
        out = shell(p, console, "ip link set eth1 up; sleep 1; "
                                "cat /sys/class/net/eth1/carrier /sys/class/net/eth0/carrier")
        assert out.split()[-2:] == ["0", "1"], out
        from vmm.api.client import ApiClient
        api = ApiClient(sock, timeout=60)
        try:
            api.patch("/network-interfaces/net1", {"iface_id": "net1", "faults": ""})
            out = shell(p, console, "sleep 1; cat /sys/class/net/eth1/carrier")
            assert out.split()[-1] == "1", out
            api.patch("/network-interfaces/net1", {"iface_id": "net1", "faults": "link=down"})
            out = shell(p, console, "sleep 1; cat /sys/class/net/eth1/carrier")
            assert out.split()[-1] == "0", out
        finally:
            api.close()

        # 30% of the frames to the guest dropped: some replies lost, not all
        rtts = ns.call(ping, GUEST_IP, 20, 2.0, 0.1)
        print(f"ping through 30% rx loss: {len(rtts)}/20 replies")
        assert 3 <= len(rtts) <= 19, len(rtts)
        p.stdin.write(b"reboot -f\n")
        p.stdin.flush()
        p.wait(120)
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(30)
        ns.delete()

    frames = [f for _, f in read_pcap(pcap)]
    icmp = [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == 1]
    requests = [f for f in icmp if f[34] == 8]
    replies = [f for f in icmp if f[34] == 0]
    # requests as delivered (after the drops), replies as sent: one per delivered request
    assert len(requests) == len(replies) >= len(rtts) > 0, (len(requests), len(replies))
    if shutil.which("tcpdump"):
        r = subprocess.run(["tcpdump", "-nr", str(pcap), "icmp"], capture_output=True, text=True)
        assert r.returncode == 0 and "ICMP echo re" in r.stdout
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    bad = [x for x in lines if x["status"] == "ioerr"]
    assert bad and all(x["sector"] <= BAD + 7 and x["fault"] == "read-error" for x in bad)
    assert any(x["status"] == "ok" and x["type"] == "read" for x in lines)


@pytest.mark.usefixtures("needs_kvm")
def test_trace_exits_tiny_guest(tmp_path):
    k = T.make_elf(T.serial_text("hi") + T.out_byte(0x80, 7) + T.CLI_HLT, str(tmp_path / "g.elf"))
    out = tmp_path / "exits.jsonl"
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                        "--timeout", "30", "--trace-exits", str(out)],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    serial = [r for r in recs if r["kind"] == "pio" and r["addr"] == 0x3F8 and r["dir"] == "write"]
    assert [r["value"] for r in serial] == [ord("h"), ord("i")]
    assert serial[0]["size"] == 1 and serial[0]["device"]
    assert any(r["addr"] == 0x80 and r["value"] == 7 for r in recs)
