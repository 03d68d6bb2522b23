"""Modern virtio-pci with MSI-X, end to end, in two boots of the default
guest kernel:

1. All three PCI transports side by side: the ext4 root on a modern
   virtio-pci disk with two queues (vda), a raw disk on legacy virtio-pci
   (vdb), one on a transitional function (vdc, Linux binds its modern side),
   and a modern two-pair NIC that a private network namespace pings.  The
   guest's /proc/interrupts must show PCI-MSI vectors for the virtio
   devices' queues, its sysfs the negotiated features, and its init writes
   to the root through the device.
2. A short one: the root on a transitional function with the guest's
   virtio_pci.force_legacy=1, so the legacy driver (with MSI-X: vector
   registers at 20/22, config at 24) runs it.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from vmm.machine import STATUS
from vmm.testing.netns import NetNs, ping
from vmm.testing.console import ConsoleReader

from test_virtio_blk_guest import BASE, kernel, make_ext4, superblock

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]
TIMEOUT = 900          # generous: guest kernel code is emulated, and the CI host is shared
CMDLINE = BASE + " root=/dev/vda rw"
GUEST_IP, HOST_IP = "10.78.0.2", "10.78.0.1"
TAP = "pvtapm0"

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "modern-pci: init running"
cat /proc/interrupts
cat /proc/partitions
for d in /sys/bus/virtio/devices/*; do echo "features $(basename $d) $(cat $d/device) $(cat $d/features)"; done
echo "written over modern virtio-pci" > /written-by-guest
sync
echo "modern-pci: ready"
# wait while the host pings: until it types a line on the console (at most 60 s)
read -t 60 line
echo "modern-pci: done $line"
reboot -f
"""

LEGACY_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "force-legacy: init running"
cat /proc/interrupts
for d in /sys/bus/virtio/devices/*; do echo "features $(basename $d) $(cat $d/features)"; done
echo "force-legacy: done"
reboot -f
"""


def msi_lines(out):
    return [line for line in out.splitlines() if "PCI-MSI" in line]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2 for a network namespace")
def test_three_pci_transports_side_by_side(tmp_path):
    root = make_ext4(tmp_path / "root.img", tmp_path, init=INIT, extra_apps=("sleep", "basename"))
    legacy, trans = tmp_path / "legacy.img", tmp_path / "trans.img"
    legacy.write_bytes(os.urandom(2 << 20))
    trans.write_bytes(os.urandom(3 << 20))
    cmdline = f"{CMDLINE} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    ns = NetNs()
    p = None
    try:
        p = subprocess.Popen(
            ns.exec_cmd([sys.executable, "-m", "vmm", "run", "--kernel", kernel(),
                         "--drive", f"file={root},transport=pci,queues=2",
                         "--drive", f"file={legacy},transport=pci-legacy",
                         "--drive", f"file={trans},transport=pci-transitional",
                         "--net", f"tap={TAP},mac=52:54:00:78:00:02,transport=pci,queues=2",
                         "--cmdline", cmdline, "--timeout", str(TIMEOUT)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
        console = ConsoleReader(p.stdout)
        assert ns.wait_link(TAP, 60), "the VMM did not create the tap"
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        assert console.wait(b"modern-pci: ready", TIMEOUT - 40), console.text[-4000:]
        rtts = ns.call(ping, GUEST_IP, 5, 5.0)
        print(f"ping {GUEST_IP}: {len(rtts)}/5 replies")
        assert len(rtts) >= 3, f"{len(rtts)}/5 ping replies\n" + console.text[-3000:]
        p.stdin.write(b"pinged\n")
        p.stdin.flush()
        assert console.wait(b"modern-pci: done pinged", 120), console.text[-3000:]
        rc = p.wait(120)
        out, err = console.text, p.stderr.read().decode(errors="replace")
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(30)
        ns.delete()
    print("\n".join(line for line in out.splitlines() if "pci" in line.lower() or "MSI" in line))
    assert rc == STATUS["reset"], err + out[-3000:]
    # the bus: modern (1042, 1041) and legacy/transitional (1001) functions
    assert "[1af4:1042]" in out and "[1af4:1041]" in out and out.count("[1af4:1001]") == 2, out[-4000:]
    assert "64bit" in out
    # disks in slot order; root mounted from the modern one and written
    disks = {line.split("[")[-1].split("]")[0] for line in out.splitlines()
             if "virtio_blk virtio" in line and "logical blocks" in line}
    assert disks == {"vda", "vdb", "vdc"}, out[-3000:]
    sb = superblock(str(root))
    assert sb["Mount count"] == "1"
    dump = subprocess.run(["debugfs", "-R", "cat /written-by-guest", str(root)],
                          capture_output=True, text=True).stdout
    assert "written over modern virtio-pci" in dump
    fsck = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # MSI-X vectors: config and request queue for the modern and transitional
    # disks, and every queue with a callback of the two-pair NIC (Linux sets
    # up all pairs' queues; with one vCPU it then uses one pair, and says so
    # with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue)
    msi = msi_lines(out)
    for name in ("virtio0-config", "virtio0-req.0", "virtio2-config", "virtio2-req.0",
                 "virtio3-input.0", "virtio3-output.0", "virtio3-input.1", "virtio3-output.1"):
        assert any(name in line for line in msi), (name, msi)
    assert not any("virtio1" in line for line in msi)           # legacy: INTx only
    # negotiated features (sysfs: one character per bit): VERSION_1 (32) on
    # all but the legacy disk, BLK_F_MQ (12) on vda, NET_F_CTRL_VQ (17) and MQ (22) on eth0
    feats = {line.split()[1]: line.split()[-1] for line in out.splitlines() if line.startswith("features ")}
    assert set(feats) == {"virtio0", "virtio1", "virtio2", "virtio3"}, out[-2000:]
    assert [feats[d][32:33] == "1" for d in sorted(feats)] == [True, False, True, True], feats
    assert feats["virtio0"][12] == "1" and feats["virtio3"][17] == feats["virtio3"][22] == "1"


def test_transitional_with_force_legacy(tmp_path):
    root = make_ext4(tmp_path / "root.img", tmp_path, init=LEGACY_INIT, extra_apps=("basename",))
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", kernel(),
                        "--drive", f"file={root},transport=pci-transitional",
                        "--cmdline", CMDLINE + " virtio_pci.force_legacy=1",
                        "--timeout", str(TIMEOUT)],
                       capture_output=True, timeout=TIMEOUT + 60, stdin=subprocess.DEVNULL)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    print("\n".join(msi_lines(out)))
    assert p.returncode == STATUS["reset"], err + out[-3000:]
    assert "force-legacy: done" in out, out[-3000:]
    feats = [line.split()[-1] for line in out.splitlines() if line.startswith("features ")]
    assert len(feats) == 1 and feats[0][32:33] in ("", "0"), feats    # no VERSION_1: legacy driver
    msi = msi_lines(out)
    assert any("virtio0-config" in line for line in msi) and any("virtio0-req.0" in line for line in msi), out[-3000:]
