"""Snapshots of the default guest (issue #11), from the session snapshot in
conftest.py (booted once to its shell, snapshotted, the VMM then gone):
restored in new processes, the shell answers; a file written to the
virtio-blk disk after the restore is on the image; the legacy virtio-pci
disk reads back; ping works; two restores run side by side on their own
disks; a Diff snapshot over its base carries the later state; bad inputs
get one line and leave the disks alone."""
import hashlib
import shutil
import subprocess
import sys
import time

import pytest

from vmm.machine import STATUS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

# the snapshot's disks have sizes of their own (conftest.py): find one by its size
EACH_DISK = "for s in /sys/block/vd*; do d=${s##*/}; "
FIND_EXT4 = EACH_DISK + "[ $(cat $s/size) = 32768 ] && D=/dev/$d; done"


def test_restored_guest_answers_at_its_shell(restored, guest_snapshot):
    t0 = time.monotonic()
    r = restored()
    r.cmd("echo $((6*7))-restored", "42-restored")
    answered = time.monotonic() - t0
    print(f"restore -> shell answered: {answered * 1000:.0f} ms "
          f"(cold boot + snapshot of the fixture: {guest_snapshot.boot_seconds:.1f} s); "
          f"snapshots: {guest_snapshot.figures}")
    r.cmd("cat /proc/uptime; echo up-$((1+1))", "up-2")    # timers tick: the shell runs on
    rc, err = r.stop()
    assert rc == STATUS["signal"], err


def test_file_written_after_restore_is_on_the_image(restored):
    r = restored()
    r.cmd(FIND_EXT4 + "; mount -t ext4 $D /mnt && echo written-after-restore > /mnt/hello "
          "&& umount /mnt && sync && echo blk-$((40+2))-done", "blk-42-done")
    rc, err = r.stop()
    assert rc == STATUS["signal"], err
    cat = subprocess.run(["debugfs", "-R", "cat /hello", r.disk], capture_output=True, text=True)
    assert cat.stdout == "written-after-restore\n", cat.stderr
    fsck = subprocess.run(["e2fsck", "-fn", r.disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_legacy_pci_disk_reads_back_after_restore(restored):
    r = restored()
    want = hashlib.md5(open(r.pci_disk, "rb").read()).hexdigest()
    out = r.cmd(EACH_DISK + "[ $(cat $s/size) = 2048 ] && md5sum /dev/$d; "
                "done; echo md5-$((2*3))-done", "md5-6-done")
    assert want in out, out[-1500:]


def msi_count(text, start, end):
    """Sum of the PCI-MSI interrupt counts /proc/interrupts printed between
    two markers (one vCPU column)."""
    part = text[text.index(start):text.index(end)]
    return sum(int(line.split()[1]) for line in part.splitlines() if "PCI-MSI" in line)


def test_modern_pci_disk_with_msix_after_restore(restored):
    """Modern virtio-pci, two queues, MSI-X: the new process routes the
    guest's MSI-X messages again (KVM routes and irqfds are per process),
    so reads complete and the vectors' counts go up."""
    r = restored()
    want = hashlib.md5(open(r.modern_disk, "rb").read()).hexdigest()
    out = r.cmd("echo 3 > /proc/sys/vm/drop_caches; echo msi-a; grep PCI-MSI /proc/interrupts; "
                "echo msi-b; " + EACH_DISK + "[ $(cat $s/size) = 3072 ] && "
                "md5sum /dev/$d; done; echo msi-c; grep PCI-MSI /proc/interrupts; "
                "echo msi-$((4*4))-done", "msi-16-done")
    out = out[out.rindex("echo msi-a"):]
    assert want in out, out[-2000:]
    before, after = msi_count(out, "\nmsi-a", "\nmsi-b"), msi_count(out, "\nmsi-c", "msi-16-done")
    assert after > before > 0, out[-2000:]


# Ping after a restore: test_virtio_net_guest.py (every transport; eth2 is
# modern virtio-pci with MSI-X and two queue pairs).


def test_two_restores_side_by_side_with_their_own_disks(restored):
    a, b = restored(), restored()
    for name, r in (("alpha", a), ("beta", b)):
        r.cmd(FIND_EXT4 + f"; mount -t ext4 $D /mnt && echo {name} > /mnt/who && umount /mnt "
              f"&& sync && echo {name}-$((5+5))", f"{name}-10")
    a.cmd("echo still-$((1+2))", "still-3")          # both still alive at once
    b.cmd("echo still-$((2+2))", "still-4")
    for r in (a, b):
        r.stop()
    for name, r in (("alpha", a), ("beta", b)):
        cat = subprocess.run(["debugfs", "-R", "cat /who", r.disk], capture_output=True, text=True)
        assert cat.stdout == f"{name}\n"


def test_diff_snapshot_over_its_base_has_the_later_state(restored, guest_snapshot):
    assert guest_snapshot.diff_error is None, guest_snapshot.diff_error
    d = restored(diff=True)
    out = d.cmd("cat /tmp/diffmark; echo diff-$((4+4))", "diff-8")
    assert "diff-was-here" in out, out[-1500:]
    f = restored()                      # the base alone: before the command ran
    out = f.cmd("cat /tmp/diffmark 2>&1; echo base-$((4+5))", "base-9")
    assert "diff-was-here" not in out.split("echo base-")[-1], out[-1500:]


def test_reboot_and_poweroff_from_a_restored_shell(restored):
    r = restored()
    r.type("reboot -f\n")
    assert r.p.wait(120) == STATUS["reset"] == 0
    r2 = restored()
    r2.type("poweroff -f\n")
    assert r2.p.wait(120) == STATUS["poweroff"] == 0


# --- bad input: one line, no traceback, disks untouched ------------------------
def restore_cli(*args):
    p = subprocess.run([sys.executable, "-m", "vmm", "restore", *args, "--resume",
                        "--timeout", "5"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr.decode(errors="replace")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("case", ["truncated", "corrupted", "wrong-mem-size", "missing-disk",
                                  "diff-without-base"])
def test_bad_restore_inputs(case, guest_snapshot, tmp_path):
    s = guest_snapshot
    disk, pci = tmp_path / "d.img", tmp_path / "p.img"
    shutil.copy(s.disk, disk)
    shutil.copy(s.pci_disk, pci)
    before = (digest(disk), digest(pci))
    state, mem = s.state, s.mem
    drives = ["--drive", f"file={disk}", "--drive", f"file={pci}"]
    if case == "truncated":
        state = tmp_path / "t.state"
        state.write_bytes(open(s.state, "rb").read()[:-100])
    elif case == "corrupted":
        data = bytearray(open(s.state, "rb").read())
        data[len(data) // 2] ^= 0x40
        state = tmp_path / "c.state"
        state.write_bytes(data)
    elif case == "wrong-mem-size":
        mem = tmp_path / "short.mem"
        mem.write_bytes(b"\0" * (1 << 20))
    elif case == "missing-disk":
        drives = ["--drive", f"file={tmp_path / 'nope.img'}"]
    elif case == "diff-without-base":
        state = s.diff_state
    rc, err = restore_cli("--snapshot", str(state), "--mem", str(mem), *drives)
    assert rc in (1, 2), err
    text = {"truncated": "truncated", "corrupted": "checksum mismatch",
            "wrong-mem-size": "wrong memory file", "missing-disk": "no such file",
            "diff-without-base": "--mem-diff"}[case]
    assert text in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert (digest(disk), digest(pci)) == before
