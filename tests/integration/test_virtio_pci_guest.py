"""virtio-blk on legacy virtio-pci, end to end: the default guest kernel
enumerates PCI bus 0 through configuration mechanism #1 (PCI_DIRECT), finds
the [1af4:1001] function, binds virtio_pci's legacy driver, takes INTx
through the MP table's PCI routing and mounts the disk as its ext4 root; with
one disk on each transport, both are seen."""
import os
import subprocess
import sys

import pytest

from vmm.machine import STATUS

from test_virtio_blk_guest import BASE, TIMEOUT, assert_root_written, kernel, make_ext4

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

def pyvmm(*args):
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", kernel(),
                        "--timeout", str(TIMEOUT), *args],
                       capture_output=True, timeout=TIMEOUT + 60, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def pci_lines(out):
    return "\n".join(line for line in out.splitlines() if "pci" in line.lower())


def test_ext4_root_on_legacy_virtio_pci(tmp_path):
    img = make_ext4(tmp_path / "root.img", tmp_path)
    rc, out, err = pyvmm("--drive", f"file={img},transport=pci-legacy", "--cmdline", BASE + " root=/dev/vda rw")
    print(pci_lines(out))        # what the kernel found on the bus (shown with -s)
    assert "PCI: Using configuration type 1" in out, out[-3000:] + err
    assert "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000" in out
    assert "pci 0000:00:01.0: [1af4:1001] type 00 class 0x010000" in out
    assert_root_written(img, rc, out, err)


def test_one_disk_on_each_transport(tmp_path):
    """An ext4 root on virtio-mmio and a raw disk on virtio-pci: both probed,
    each through its own transport."""
    root = make_ext4(tmp_path / "root.img", tmp_path, init="""#!/bin/sh
mount -t proc proc /proc
echo "two-disks: init running"
cat /proc/partitions
reboot -f
""")
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(3 << 20))
    rc, out, err = pyvmm("--drive", f"file={root}", "--drive", f"file={data},transport=pci-legacy",
                         "--cmdline", BASE + " root=/dev/vda rw")
    print(pci_lines(out))
    assert "[1af4:1001]" in out, out[-3000:] + err
    disks = {line.split("[")[-1].split("]")[0]: line for line in out.splitlines()
             if "virtio_blk virtio" in line and "logical blocks" in line}
    assert set(disks) == {"vda", "vdb"}, out[-3000:] + err
    assert "two-disks: init running" in out, out[-3000:] + err
    sizes = {name: int(line.split("] ")[-1].split()[0]) for name, line in disks.items()}
    assert sorted(sizes.values()) == [(3 << 20) // 512, 32 * 2048]
    assert rc == STATUS["reset"], err
