"""Fault injection, tracing and virtio-rng end to end, in ONE run of the
default guest restored at its shell from the session snapshot (conftest.py;
the faults, trace and pcap options are the restore's backend options for
its disk and NICs), driven over its serial console: a disk with an injected
bad range (the guest's kernel log names exactly that sector, other reads
succeed), the entropy device (rng_current names virtio_rng, /dev/hwrng gives
4 KiB), a NIC dropping 30% of the frames to the guest (a ping from the
private network namespace loses some replies, not all) recorded to a pcap
file (parsed: ICMP both ways), and a NIC whose link the API takes down and
up (the guest sees its carrier follow).  Plus --trace-exits on a tiny guest
(milliseconds)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from vmm.testing.netns import ping
import vmm.testing.tinyguest as T
from vmm.virtio.trace import read_pcap

GUEST_IP = "10.77.0.2"     # eth0 (virtio-mmio) of the session snapshot: conftest.NICS["mmio"]
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


@pytest.mark.slow(35)
@pytest.mark.integration
@pytest.mark.usefixtures("needs_kvm")
@needs_netns
def test_faults_rng_pcap_one_run(restored, guest_snapshot, tmp_path):
    data = open(guest_snapshot.disk, "rb").read()      # the restore's copy of vda has these bytes
    pcap = tmp_path / "net.pcap"
    trace = tmp_path / "disk.jsonl"
    r = restored(api=True,
                 drive_opts={"scratch.img": f",faults=read-error@{BAD}-{BAD + 7};seed=1,trace={trace}"},
                 net_opts={"mmio": f",faults=rx.drop=30%;seed=4,pcap={pcap}"})
    p, console = r.p, r.console
    try:
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

        # the API takes the second NIC's (eth1, legacy virtio-pci) link down, up, down
        from vmm.api.client import ApiClient
        api = ApiClient(r.api_sock, timeout=60)
        try:
            out = shell(p, console, "cat /sys/class/net/eth1/carrier /sys/class/net/eth0/carrier")
            assert out.split()[-2:] == ["1", "1"], out
            api.patch("/network-interfaces/net1", {"iface_id": "net1", "faults": "link=down"})
            out = shell(p, console, "sleep 1; cat /sys/class/net/eth1/carrier /sys/class/net/eth0/carrier")
            assert out.split()[-2:] == ["0", "1"], out
            api.patch("/network-interfaces/net1", {"iface_id": "net1", "faults": ""})
            out = shell(p, console, "sleep 1; cat /sys/class/net/eth1/carrier")
            assert out.split()[-1] == "1", out
            api.patch("/network-interfaces/net1", {"iface_id": "net1", "faults": "link=down"})
            out = shell(p, console, "sleep 1; cat /sys/class/net/eth1/carrier")
            assert out.split()[-1] == "0", out
        finally:
            api.close()

        # 30% of the frames to the guest dropped: some replies lost, not all
        rtts = r.ns.call(ping, GUEST_IP, 20, 2.0, 0.1)
        print(f"ping through 30% rx loss: {len(rtts)}/20 replies")
        assert 3 <= len(rtts) <= 19, len(rtts)
        p.stdin.write(b"reboot -f\n")
        p.stdin.flush()
        p.wait(120)
    finally:
        r.close()

    frames = [f for _, f in read_pcap(pcap)]
    icmp = [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == 1]
    requests = [f for f in icmp if f[34] == 8]
    replies = [f for f in icmp if f[34] == 0]
    # requests as delivered (after the drops), replies as sent: one per delivered request
    assert len(requests) == len(replies) >= len(rtts) > 0, (len(requests), len(replies))
    if shutil.which("tcpdump"):
        t = subprocess.run(["tcpdump", "-nr", str(pcap), "icmp"], capture_output=True, text=True)
        assert t.returncode == 0 and "ICMP echo re" in t.stdout
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
