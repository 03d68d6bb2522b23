"""virtio-blk end to end: the default guest kernel mounts an ext4 image on
virtio-mmio as its root and writes to it; a partition table is read back
through the kernel from a read-only disk, which stays untouched (restored at
its shell from the session snapshot, conftest.py)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from vmm import guest
from vmm.machine import STATUS

from conftest import PARTS_SERIAL

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

TIMEOUT = 900          # a cold boot: ~40 s here, minutes on a loaded host
BASE = "console=ttyS0 reboot=k panic=-1 pvpanic_mmio.ioport=0x505 rodata=off 8250.nr_uarts=1 nopti"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

INIT = """#!/bin/sh
mount -t proc proc /proc
echo "disk-root: init running"
cat /proc/mounts
echo "written by the guest" > /written-by-guest
sync
echo "disk-root: done"
reboot -f
"""


def kernel():
    k, _ = guest.default_guest()
    if not os.path.exists(k):
        pytest.fail("default guest not built: run `make guest`")
    return k


def make_ext4(path, tmp_path, init=INIT, size_mb=32, extra_apps=()):
    root = tmp_path / "rootfs"
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for app in ("sh", "mount", "echo", "grep", "sync", "reboot", "cat", *extra_apps):
        os.symlink("busybox", root / "bin" / app)
    (root / "sbin" / "init").write_text(init)
    os.chmod(root / "sbin" / "init", 0o755)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(path), f"{size_mb}M"], check=True)
    return str(path)


def superblock(path):
    out = subprocess.run(["dumpe2fs", "-h", path], capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def pyvmm(*args):
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", kernel(),
                        "--timeout", str(TIMEOUT), *args],
                       capture_output=True, timeout=TIMEOUT + 60, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


@pytest.mark.slow(40)
@pytest.mark.parametrize("engine", ["sync", "io_uring"])
def test_ext4_root_mounted_and_written(tmp_path, engine):
    """io_uring: the ring served on the I/O thread's C fast path, under its
    seccomp filter (native/src/fasturing.c)."""
    if engine == "io_uring":
        from vmm.virtio import blk_uring
        ok, why = blk_uring.available()
        if not ok:
            pytest.skip(f"io_uring unavailable here: {why}")
    img = make_ext4(tmp_path / "root.img", tmp_path)
    before = superblock(img)
    assert before["Mount count"] == "0" and before["Last mount time"] == "n/a"
    drive = f"file={img}" + (f",io_engine={engine}" if engine != "sync" else "")
    rc, out, err = pyvmm("--drive", drive, "--mem", "128M",     # enough; boots faster
                         "--cmdline", BASE + " root=/dev/vda rw")
    assert_root_written(img, rc, out, err)


def assert_root_written(img, rc, out, err):
    """The guest mounted `img` as its ext4 root, ran INIT from it and
    rebooted; check what it wrote: the superblock's mount count and time (the
    kernel's own witness) and the file its init wrote through the device."""
    assert "virtio_blk virtio0: [vda]" in out, out[-3000:] + err
    assert "EXT4-fs (vda): mounted filesystem" in out
    assert "disk-root: init running" in out and "/dev/root / ext4 rw" in out
    assert "disk-root: done" in out, out[-2000:]
    assert rc == STATUS["reset"], err
    after = superblock(img)
    assert after["Mount count"] == "1"
    assert after["Last mount time"] != "n/a"
    cat = subprocess.run(["debugfs", "-R", "cat /written-by-guest", img], capture_output=True, text=True)
    assert cat.stdout == "written by the guest\n"
    fsck = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_partition_table_read_through_the_kernel(restored, guest_snapshot):
    """The session snapshot's read-only disk (on a transitional virtio-pci
    function: the VMM takes at most 9 devices) holds an MBR with
    two primary partitions (conftest.PARTITIONS): the guest kernel found them
    at boot, and finds them again when told to re-read the table in the
    restored VM (page cache dropped first: the reads go through this
    process's device); the image is never written."""
    r = restored()
    before = open(r.parts_disk, "rb").read()
    assert before == open(guest_snapshot.parts_disk, "rb").read()
    # parsed by patterns the shell's echo of the typed (and wrapped) line cannot match
    find = ("for s in /sys/block/vd*; do [ $(cat $s/size) = 16384 ] && D=${s##*/}; done; "
            "echo disk=$D ro=$(cat /sys/block/$D/ro) serial=$(cat /sys/block/$D/serial)")
    out = r.cmd(find + "; dmesg > /tmp/dmesg; grep $D /tmp/dmesg; echo boot-$((2+2))", "boot-4")
    m = re.search(r"disk=(vd[a-z]+) ro=(\d) serial=(\S+)", out)
    assert m and m.group(2, 3) == ("1", PARTS_SERIAL), out[-2000:]
    dev = m.group(1)
    assert f" {dev}: {dev}1 {dev}2" in out, out[-2000:]                # the boot's scan
    assert f"[{dev}] 16384 512-byte logical blocks" in out
    start = len(r.console.buf)
    r.cmd(f"echo 3 > /proc/sys/vm/drop_caches; blockdev --rereadpt /dev/{dev}; "
          f"echo rc=$? scans=$(dmesg | grep -c ' {dev}: {dev}1 {dev}2'); "
          f"grep {dev} /proc/partitions; echo reread-$((3+3))", "reread-6")
    out = r.console.buf[start:].decode(errors="replace").replace("\r", "")
    assert re.search(r"rc=0 scans=2\b", out), out                    # scanned a second time
    parts = {m.group(2): int(m.group(1)) for m in
             re.finditer(r"^\s*\d+\s+\d+\s+(\d+)\s+(vd\w+)\s*$", out, re.M)}
    assert parts == {dev: 8192, f"{dev}1": 2048, f"{dev}2": 4096}, out   # 1 KiB blocks
    r.type("poweroff -f\n")
    assert r.p.wait(120) == STATUS["poweroff"], r.stop()[1]
    assert open(r.parts_disk, "rb").read() == before


def test_image_in_use_is_refused(tmp_path):
    img = tmp_path / "busy.img"
    img.write_bytes(bytes(1 << 20))
    import fcntl
    with open(img, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out, err = pyvmm("--drive", f"file={img}")
    assert rc == 1
    assert err.strip().count("\n") == 0 and "in use" in err and "Traceback" not in err


@pytest.mark.parametrize("spec,text", [
    ("file=/nonexistent.img", "no such file"),
    ("readonly=on", "file=PATH is required"),
    ("file=x,bogus=1", "unknown option"),
    ("file=x,transport=usb", "unknown transport"),
])
def test_bad_drive_specs(spec, text, tmp_path):
    rc, _, err = pyvmm("--drive", spec)
    assert rc == 2 and text in err and err.strip().count("\n") == 0
