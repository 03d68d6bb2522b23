"""Modern virtio-pci with MSI-X, end to end, with the default guest kernel:

1. All three PCI transports side by side, in the guest restored from the
   session snapshot (conftest.py): a raw disk on legacy virtio-pci, one on
   modern virtio-pci with two queues (an ext4 image in this test), one on a
   transitional function (Linux binds its modern side; read-only), and a modern
   two-pair NIC that a private network namespace pings.  The guest's
   /proc/interrupts must show PCI-MSI vectors for the virtio devices'
   queues, its sysfs the negotiated features, and it writes to the ext4 file
   system through the modern device.
2. A cold boot: the root on a transitional function with the guest's
   virtio_pci.force_legacy=1 (a boot parameter), so the legacy driver (with
   MSI-X: vector registers at 20/22, config at 24) runs it.
"""
import os
import re
import subprocess
import sys

import pytest

from vmm.machine import STATUS
from vmm.testing.netns import ping

from conftest import NICS
from test_virtio_blk_guest import BASE, kernel, make_ext4, superblock

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]
TIMEOUT = 900          # generous: guest kernel code is emulated, and the CI host is shared
CMDLINE = BASE + " root=/dev/vda rw"

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


def pci_devices(out):
    """{virtioN: (virtio device id, features, PCI vendor:device, slot)} of
    the guest's virtio devices on PCI, from the listing SCRIPT prints
    (patterns the shell's echo of the typed, wrapped line cannot match)."""
    ids = dict(re.findall(r"pci (0000:00:[0-9a-f]{2}\.0): \[(1af4:[0-9a-f]{4})\] type", out))
    devs = {}
    for name, dev_id, feats, slot in re.findall(
            r"^vdev (virtio\d+) (0x[0-9a-f]+) ([01]+) /sys/devices/pci0000:00/(0000:00:[0-9a-f]{2}\.0)/",
            out, re.M):
        devs[name] = (dev_id, feats, ids.get(slot), slot)
    return devs


SCRIPT = ("dmesg > /tmp/dmesg; grep -e '\\[1af4:' -e 64bit -e 'virtio_blk virtio' /tmp/dmesg; "
          "grep PCI-MSI /proc/interrupts; for d in /sys/bus/virtio/devices/*; do "
          "echo vdev $(basename $d) $(cat $d/device) $(cat $d/features) $(readlink -f $d); done; "
          "for s in /sys/block/vd*; do echo blk ${s##*/} $(cat $s/size) $(readlink -f $s/device); "
          "done; echo pci-$((3*3))-listed")


@pytest.mark.slow(40)
def test_three_pci_transports_side_by_side(restored, guest_snapshot, tmp_path):
    """From the session snapshot (conftest.py), whose guest has a raw disk
    on legacy virtio-pci, one on modern virtio-pci with MSI-X and two
    queues, a (read-only, partitioned) one on a transitional function, a legacy NIC and a modern
    two-pair NIC: the bus, the MSI-X vectors and negotiated features the
    guest kernel set up at boot, an ext4 file system on the modern disk
    (this restore's image) mounted and written, and a ping of the modern NIC."""
    if not guest_snapshot.has_net:
        pytest.skip("needs root and iproute2 for a network namespace")
    img = str(tmp_path / "modern.img")
    with open(img, "wb") as f:
        f.truncate(os.path.getsize(guest_snapshot.modern_disk))   # a restore keeps its size
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    r = restored(images={"pci-modern.img": img})
    out = r.cmd(SCRIPT, "pci-9-listed").replace("\r", "")
    print(out)
    # the bus: modern (1042, 1041) and legacy/transitional (1001: two disks) functions
    assert "[1af4:1042]" in out and "[1af4:1041]" in out and out.count("[1af4:1001]") == 2, out
    assert re.search(r"BAR \d \[mem 0x[0-9a-f]+-0x[0-9a-f]+ 64bit", out), out
    devs = pci_devices(out)
    by_id = {}
    for name, (dev_id, _, pci_id, _) in devs.items():
        by_id.setdefault((int(dev_id, 16), pci_id), []).append(name)
    (legacy, trans), = [sorted(by_id[(2, "1af4:1001")], key=lambda n: devs[n][3])]
    (modern,), (nic,), (legacy_nic,) = by_id[(2, "1af4:1042")], by_id[(1, "1af4:1041")], \
        by_id[(1, "1af4:1000")]
    assert devs[legacy][3] == "0000:00:01.0", devs                # slot order
    # each PCI disk probed by virtio_blk, with its own size, under its own function
    disks = {name: (int(size), path) for name, size, path in
             re.findall(r"^blk (vd[a-z]+) (\d+) (/sys/\S+)$", out, re.M)}
    pci_disks = {}
    for name, (size, path) in disks.items():
        for dev in (legacy, modern, trans):
            if path.endswith(f"/{devs[dev][3]}/{dev}"):
                pci_disks[dev] = (name, size)
    sizes = {dev: os.path.getsize(p) // 512 for dev, p in ((legacy, guest_snapshot.pci_disk),
             (modern, img), (trans, guest_snapshot.parts_disk))}
    assert {dev: size for dev, (_, size) in pci_disks.items()} == sizes, (disks, devs)
    probed = {line.split("[")[-1].split("]")[0] for line in out.splitlines()
              if "virtio_blk virtio" in line and "logical blocks" in line}
    assert {name for name, _ in pci_disks.values()} <= probed, out
    # MSI-X vectors: config and request queue for the modern and transitional
    # disks, and every queue with a callback of the two-pair NIC (Linux sets
    # up all pairs' queues; with one vCPU it then uses one pair, and says so
    # with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue)
    msi = re.findall(r"^\s*\d+:\s+\d+\s+PCI-MSI .*$", out, re.M)
    for name in (f"{modern}-config", f"{modern}-req.0", f"{trans}-config", f"{trans}-req.0",
                 f"{nic}-input.0", f"{nic}-output.0", f"{nic}-input.1", f"{nic}-output.1"):
        assert any(name in line for line in msi), (name, msi)
    for dev in (legacy, legacy_nic):                              # legacy: INTx only
        assert not any(f"{dev}-" in line for line in msi), (dev, msi)
    # negotiated features (sysfs: one character per bit): VERSION_1 (32) on
    # all but the legacy functions, BLK_F_MQ (12) on the modern disk,
    # NET_F_CTRL_VQ (17) and MQ (22) on the modern NIC
    feats = {name: f for name, (_, f, _, _) in devs.items()}
    assert [feats[d][32:33] == "1" for d in (modern, trans, nic, legacy, legacy_nic)] == \
        [True, True, True, False, False], feats
    assert feats[modern][12] == "1" and feats[nic][17] == feats[nic][22] == "1", feats
    # the modern disk carries I/O: mount this restore's ext4 image and write
    dev = pci_disks[modern][0]
    r.cmd(f"echo 3 > /proc/sys/vm/drop_caches; mount -t ext4 /dev/{dev} /mnt && "
          "echo 'written over modern virtio-pci' > /mnt/written-by-guest && umount /mnt && "
          "sync && echo ext4-$((40+2))-done", "ext4-42-done")
    nic_cfg = NICS["pci"]
    rtts = r.ns.call(ping, nic_cfg["guest"], 5, 5.0)
    print(f"ping {nic_cfg['guest']} (modern NIC): {len(rtts)}/5 replies")
    assert len(rtts) >= 3, f"{len(rtts)}/5 ping replies"
    r.type("reboot -f\n")
    assert r.p.wait(120) == STATUS["reset"], r.stop()[1]
    written = r.modern_disk                    # the restore's own copy of `img`
    sb = superblock(written)
    assert sb["Mount count"] == "1"
    dump = subprocess.run(["debugfs", "-R", "cat /written-by-guest", written],
                          capture_output=True, text=True).stdout
    assert "written over modern virtio-pci" in dump
    fsck = subprocess.run(["e2fsck", "-fn", written], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.slow(45)
def test_transitional_with_force_legacy(tmp_path):
    root = make_ext4(tmp_path / "root.img", tmp_path, init=LEGACY_INIT, extra_apps=("basename",))
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", kernel(),
                        "--drive", f"file={root},transport=pci-transitional", "--mem", "128M",
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
