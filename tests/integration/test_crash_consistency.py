"""Crash consistency (issue #14): the VMM is SIGKILLed while the guest
writes through ext4 with a journal; the guest's next run replays the
journal, the data it flushed (sync) before the kill is there, and e2fsck
finds the file system clean.  Two runs of the default guest restored from
the session snapshot at its shell (conftest.py), driven through the serial
shell: the first on a fresh ext4 image, the second on the image the killed
VMM left.

What this shows: a FLUSH the guest saw completed means the data reached the
image (pyvmm buffers nothing; FLUSH is fdatasync, tests/unit cover that),
and a VMM killed at any point leaves an image ext4 recovers from.  It does
not simulate a host power loss (the host's page cache survives a killed
process)."""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

DISK = "scratch.img"        # the snapshot's virtio-mmio disk: /dev/vda in the guest


def wait_for(r, pattern, timeout):
    """The first match of `pattern` (a bytes regex) in r's console output
    from its restore on, or None at the timeout or the VMM's exit."""
    c = r.console
    deadline = time.monotonic() + timeout
    with c.cond:
        while True:
            m = re.search(pattern, c.buf)
            if m or c.eof:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            c.cond.wait(left)


@pytest.mark.slow(25)
def test_sigkill_during_ext4_writes_keeps_flushed_data_and_fs_clean(guest_snapshot, restored,
                                                                    tmp_path):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("needs e2fsprogs")
    # A fresh ext4 with a journal and 1 KiB blocks, the size of the snapshot's
    # disk (a restore keeps the device's capacity) and nothing on it.
    img = str(tmp_path / "root.img")
    with open(img, "wb") as f:
        f.truncate(os.path.getsize(guest_snapshot.disk))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-j", "-b", "1024", img], check=True)

    # Run 1: write and flush a file, then keep writing until killed.  The
    # guest's page cache may hold blocks of the snapshot's own image of vda
    # (read by the partition scan at boot): drop it first, as a boot would
    # start with none.
    vm = restored(images={DISK: img})
    try:
        # markers use $((...)) so the tty's echo of the typed line never matches
        vm.type("sync; echo 3 > /proc/sys/vm/drop_caches; "
                "mount -t ext4 /dev/vda /mnt && echo pyvmm-crash: mount$((1+1))\n")
        assert wait_for(vm, rb"pyvmm-crash: mount2", 300), vm.console.text[-3000:]
        vm.type("dd if=/dev/urandom of=/mnt/flushed bs=1024 count=192 2>/dev/null; sync; "
                "echo pyvmm-crash: sum $(sha256sum /mnt/flushed)\n")
        m = wait_for(vm, rb"pyvmm-crash: sum ([0-9a-f]{64})", 300)
        assert m, vm.console.text[-3000:]
        digest = m.group(1)
        vm.type("i=0; while :; do dd if=/dev/zero of=/mnt/junk$i bs=1024 count=32 2>/dev/null; "
                "echo pyvmm-crash: wrote $i; i=$((i+1)); done\n")
        assert wait_for(vm, rb"pyvmm-crash: wrote 3\b", 300), vm.console.text[-3000:]
    finally:
        vm.p.send_signal(signal.SIGKILL)      # mid-write: no flush, no close
        vm.p.wait(30)
    assert vm.p.returncode == -signal.SIGKILL
    # the kill left the journal to replay (ext4 marks it while mounted)
    hdr = subprocess.run(["dumpe2fs", "-h", vm.disk], capture_output=True, text=True).stdout
    assert "needs_recovery" in hdr

    # Run 2, on the image run 1 left: the guest kernel replays the journal on
    # mount; the flushed file is intact; unmount cleanly and power off.
    vm2 = restored(images={DISK: vm.disk})
    vm2.type("sync; echo 3 > /proc/sys/vm/drop_caches; "
             "mount -t ext4 /dev/vda /mnt && echo pyvmm-crash: after $(sha256sum /mnt/flushed)"
             " && umount /mnt && echo pyvmm-crash: un$((1+1))mounted; poweroff -f\n")
    m = wait_for(vm2, rb"pyvmm-crash: after ([0-9a-f]{64})", 300)
    assert m, vm2.console.text[-3000:]
    assert m.group(1) == digest                     # flushed data survived
    assert wait_for(vm2, rb"pyvmm-crash: un2mounted", 300), vm2.console.text[-3000:]
    try:
        rc = vm2.p.wait(300)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, vm2.stop()[1]
    fsck = subprocess.run(["e2fsck", "-fn", vm2.disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr        # clean
