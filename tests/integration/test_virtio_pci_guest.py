"""virtio-blk on legacy virtio-pci, end to end, in the default guest restored
at its shell from the session snapshot (conftest.py: an ext4 disk on
virtio-mmio, a raw disk on legacy virtio-pci, one on modern virtio-pci): the
guest kernel enumerated PCI bus 0 through configuration mechanism #1
(PCI_DIRECT), found the [1af4:1001] function and bound virtio_pci's legacy
driver (INTx through the MP table's PCI routing); an ext4 file system on
the legacy disk is mounted and written; with one disk on each transport,
each is seen through its own."""
import os
import subprocess

import pytest

from test_virtio_blk_guest import superblock

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

# Each block device: name, size in sectors, sysfs path (shows its transport).
LIST = ("for d in /sys/block/vd*; do echo blk $(basename $d) $(cat $d/size) "
        "$(readlink -f $d/device); done")


def disks(out):
    return {f[1]: (int(f[2]), f[3]) for f in (line.split() for line in out.splitlines())
            if len(f) == 4 and f[0] == "blk"}


def test_ext4_on_legacy_virtio_pci(restored, tmp_path):
    img = str(tmp_path / "legacy.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)            # the snapshot's legacy virtio-pci disk: 2048 sectors
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    before = superblock(img)
    assert before["Mount count"] == "0" and before["Last mount time"] == "n/a"
    r = restored(images={"pci.img": img})
    # a pipeline again: its busybox processes died on leaked YMM state until
    # the software-KVM template turned off glibc's AVX routines (cpuid.GLIBC_NO_AVX)
    out = r.cmd("dmesg | grep -i pci; " + LIST + "; echo list-$((2+2))-done", "list-4-done")
    print(out)                       # what the kernel found on the bus (shown with -s)
    assert "PCI: Using configuration type 1" in out, out[-3000:]
    assert "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000" in out
    assert "pci 0000:00:01.0: [1af4:1001] type 00 class 0x010000" in out
    found = {name: path for name, (size, path) in disks(out).items() if size == 2048}
    assert len(found) == 1, out[-2000:]
    (dev, path), = found.items()
    assert "/pci0000:00/0000:00:01.0/" in path, path        # the legacy function in slot 1
    # the guest's page cache may hold the snapshot's image of this disk (the
    # partition scan at boot): drop it, then mount the file system and write
    r.cmd(f"echo 3 > /proc/sys/vm/drop_caches; mount -t ext4 /dev/{dev} /mnt && "
          "grep /mnt /proc/mounts && echo 'written by the guest' > /mnt/written-by-guest && "
          "umount /mnt && sync && echo ext4-$((40+2))-done", "ext4-42-done")
    # the legacy disk's INTx (a KVM resample irqfd where KVM has one): its
    # interrupts counted, and no storm of unhandled ones (the kernel
    # disables a line that gets 99,900 of 100,000 unhandled: "nobody cared")
    irqs = r.cmd("cat /proc/interrupts; dmesg | grep -i 'nobody c[a]red'; "
                 "echo irq-$((2+2))-done", "irq-4-done")
    print(irqs)
    assert "nobody cared" not in irqs.lower(), irqs[-3000:]
    r.stop()
    after = superblock(r.pci_disk)
    assert after["Mount count"] == "1"
    assert after["Last mount time"] != "n/a"
    cat = subprocess.run(["debugfs", "-R", "cat /written-by-guest", r.pci_disk],
                         capture_output=True, text=True)
    assert cat.stdout == "written by the guest\n"
    fsck = subprocess.run(["e2fsck", "-fn", r.pci_disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_one_disk_on_each_transport(restored, guest_snapshot):
    """An ext4 disk on virtio-mmio, raw disks on legacy and modern
    virtio-pci and a partitioned one on a transitional function: each
    probed, through its own transport, with its size."""
    r = restored()
    out = r.cmd("dmesg > /tmp/dmesg; grep 'virtio_blk virtio' /tmp/dmesg; " + LIST + "; echo list-$((2+2))-done",
                "list-4-done")
    print(out)
    assert "[1af4:1001]" in r.cmd("grep 1af4 /tmp/dmesg; echo grep-$((2+2))-done", "grep-4-done"), out[-3000:]
    probed = {line.split("[")[-1].split("]")[0] for line in out.splitlines()
              if "virtio_blk virtio" in line and "logical blocks" in line}
    found = disks(out)
    assert probed == set(found) == {"vda", "vdb", "vdc", "vdd"}, out[-3000:]
    by_size = {size: path for size, path in found.values()}
    snap = guest_snapshot
    sizes = [os.path.getsize(p) // 512 for p in (snap.disk, snap.pci_disk, snap.modern_disk,
                                                  snap.parts_disk)]
    assert sorted(by_size) == sorted(sizes), found
    mmio, legacy, modern, trans = (by_size[s] for s in sizes)
    assert "virtio-mmio" in mmio and "pci0000" not in mmio, mmio
    assert "/pci0000:00/0000:00:01.0/" in legacy, legacy
    for path in (modern, trans):
        assert "/pci0000:00/" in path and "0000:00:01.0" not in path, path
