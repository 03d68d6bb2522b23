"""The default guest (make guest) under `pyvmm run`: the MP table lists every
vCPU; a panic gives the panic status (restored from the session snapshot,
conftest.py).  Booting to init, its init script and the power-off are
checked in test_console.py's bzImage boot."""
import os
import signal
import subprocess
import sys

import pytest

from vmm import guest
from vmm.machine import STATUS
from vmm.testing.console import ConsoleReader

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]

BASE = "console=ttyS0 reboot=k panic=-1 pvpanic_mmio.ioport=0x505 8250.nr_uarts=1 nopti"


@pytest.fixture(scope="module")
def default_guest():
    kernel, initrd = guest.default_guest()
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        pytest.fail("default guest not built: run `make guest`")
    return kernel, initrd


# Boot to init, run its init script, power off: test_console.py's
# test_bzimage_boots_to_init (one boot checks the loader and all of it).


@pytest.mark.slow(15)
def test_smp_guest_sees_every_cpu_in_the_mp_table(default_guest):
    # On software KVM secondary CPUs never finish starting (also under QEMU,
    # see ../shared/notes/kvm-host.md), so stop early once the kernel has
    # parsed the MP table (SIGTERM: a clean stop); on hardware KVM the guest
    # may have powered off by itself by then.
    p = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--cpus", "3", "--timeout", "900",
                          "--cmdline", BASE + " pyvmm.test=poweroff"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        console = ConsoleReader(p.stdout)
        seen = (console.wait(b"smpboot: Allowing 3 CPUs, 0 hotplug CPUs", 600)    # minutes if loaded
                and console.wait(b"IOAPIC[0]: apic_id 3", 120))
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    out = console.text
    assert seen, out[-3000:]
    assert "smpboot: Allowing 3 CPUs, 0 hotplug CPUs" in out and "IOAPIC[0]: apic_id 3" in out
    assert rc in (STATUS["poweroff"], STATUS["signal"]), p.stderr.read().decode(errors="replace")


def test_guest_panic_gives_panic_status(restored, guest_snapshot, tmp_path):
    """A panic of the running guest kernel ends the VMM with the panic status
    (the guest's pvpanic driver tells the device).  From the session
    snapshot at its shell (conftest.py): the panic is ext4's errors=panic on
    a file system whose directory inode has a broken extent header (the
    kernel's own check, reached in a few system calls; the kernel has no
    MAGIC_SYSRQ to crash it on demand)."""
    img = str(tmp_path / "corrupt.img")
    with open(img, "wb") as f:
        f.truncate(os.path.getsize(guest_snapshot.disk))     # a restore keeps the disk's size
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    for req in ("mkdir broken", "sif broken block[0] 0"):     # i_block[0]: eh_magic, eh_entries
        subprocess.run(["debugfs", "-w", "-R", req, img], check=True, capture_output=True)
    r = restored(images={"scratch.img": img})
    # the page cache may hold the snapshot's own image of vda: drop it first
    r.type("echo 3 > /proc/sys/vm/drop_caches; mount -t ext4 -o errors=panic /dev/vda /mnt && "
           "echo mounted-$((1+1)) && ls /mnt/broken\n")
    try:
        rc = r.p.wait(300)
    except subprocess.TimeoutExpired:
        rc = None
    out, err = r.console.text, r.stop()[1]
    assert "mounted-2" in out, out[-3000:]
    assert "Kernel panic" in out, out[-3000:]
    assert rc == STATUS["panic"], err
    assert "pvpanic" in err


# reboot and poweroff from the shell: test_snapshot_guest.py (from a restored guest).
