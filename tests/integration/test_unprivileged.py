"""pyvmm runs as an ordinary user given access to /dev/kvm (issue #14): no
root for a VM without a NIC, and a NIC on a tap that root created for that
user beforehand.  The tests grant a spare uid rw on /dev/kvm with an ACL
(and on /dev/net/tun where it is not world-usable; removed again afterwards) and run the VMM under it with setpriv, seccomp
filters on."""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import vmm.testing.tinyguest as T
from vmm import guest

pytestmark = pytest.mark.usefixtures("needs_kvm")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UID = 61234                     # no passwd entry: nothing else runs as it
UID_NO_KVM = 61235              # another one, never granted /dev/kvm


@contextlib.contextmanager
def granted(uid, devices):
    """ACLs for `uid`: rw on `devices`, x on the directories down to the
    checkout and the venv.  Tests on other xdist workers may hold the same
    grants at the same time: each holds a shared lock while it runs and
    only the last one out (the exclusive lock is free) takes them back, so
    no test loses its access to a teardown elsewhere."""
    lock = open(f"/tmp/pyvmm-unpriv-{uid}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_SH)
    granted = []
    try:
        # /dev/net/tun is 0666 on most distributions, 0600 in some containers
        for dev in devices:
            subprocess.run(["setfacl", "-m", f"u:{uid}:rw", dev], check=True)
            granted.append(dev)
        # the checkout (and its venv) may sit below a 0700 directory, e.g. a
        # mktemp -d clone: let the uid traverse to it, and only that
        for top in (ROOT, os.path.realpath(sys.executable)):
            a = os.path.dirname(os.path.abspath(top))
            while a != "/":
                if not os.stat(a).st_mode & 0o001:
                    subprocess.run(["setfacl", "-m", f"u:{uid}:x", a], check=True)
                    granted.append(a)
                a = os.path.dirname(a)
        yield
    finally:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            granted = []            # another test still uses them: it takes them back
        for path in granted:
            subprocess.run(["setfacl", "-x", f"u:{uid}", path], check=False)
        lock.close()


def user_dir(uid):
    d = tempfile.mkdtemp(prefix="pyvmm-unpriv-")
    os.chmod(d, 0o755)
    os.chown(d, uid, uid)
    return d


def need_root_tools():
    if os.geteuid() != 0:
        pytest.skip("needs root to grant a test uid access to /dev/kvm")
    if not shutil.which("setfacl") or not shutil.which("setpriv"):
        pytest.skip("needs setfacl (acl) and setpriv (util-linux)")


@pytest.fixture
def user():
    """(uid, a directory it owns): /dev/kvm rw for uid through an ACL."""
    need_root_tools()
    d = user_dir(UID)
    try:
        with granted(UID, ("/dev/kvm", "/dev/net/tun")):
            yield UID, d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def user_without_kvm():
    """(uid, a directory it owns) for a uid that may not open /dev/kvm."""
    need_root_tools()
    d = user_dir(UID_NO_KVM)
    try:
        with granted(UID_NO_KVM, ()):
            yield UID_NO_KVM, d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_user(uid, home, args, timeout):
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": ROOT}
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
           "--", sys.executable, "-m", "vmm", "run", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, cwd=home)


def user_file(uid, d, name, data=None, src=None):
    path = os.path.join(d, name)
    if src is not None:
        shutil.copyfile(src, path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    os.chown(path, uid, uid)
    return path


def test_tiny_guest_with_disk_and_precreated_tap_as_user(user):
    uid, d = user
    kernel = T.make_elf(T.serial_text("unprivileged\n") + T.CLI_HLT, os.path.join(d, "g.elf"))
    img = user_file(uid, d, "disk.img", bytes(1 << 20))
    tap = f"pvu{os.getpid() % 10000}"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "user", str(uid), "vnet_hdr"],
                   check=True)
    try:
        p = as_user(uid, d, ["--kernel", kernel, "--mem", "32M", "--timeout", "120",
                             "--drive", f"file={img}", "--net", f"tap={tap}"], 180)
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout == b"unprivileged\n"
        assert os.path.exists(f"/sys/class/net/{tap}")      # the user's tap is left in place
    finally:
        subprocess.run(["ip", "link", "del", tap], check=False)


def test_without_kvm_access_one_line_error(user_without_kvm):
    # (its own uid: taking /dev/kvm away from UID would pull it from under
    # a test using UID on another xdist worker)
    uid, d = user_without_kvm
    kernel = T.make_elf(T.CLI_HLT, os.path.join(d, "g.elf"))
    p = as_user(uid, d, ["--kernel", kernel, "--mem", "32M", "--timeout", "10"], 60)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "/dev/kvm" in err, err


@pytest.mark.slow(45)
@pytest.mark.integration
def test_default_guest_boots_to_done_as_user(user):
    uid, d = user
    kernel, initrd = guest.default_guest()
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        pytest.fail("default guest not built: run `make guest`")
    k = user_file(uid, d, "vmlinux", src=kernel)
    i = user_file(uid, d, "initramfs.cpio", src=initrd)
    p = as_user(uid, d, ["--kernel", k, "--initrd", i, "--mem", "128M", "--timeout", "800", "--cmdline",
                         guest.DEFAULT_CMDLINE + " pyvmm.test=poweroff"], 860)
    out = p.stdout.decode(errors="replace")
    assert "pyvmm-guest: done" in out, out[-2000:] + p.stderr.decode()
    assert p.returncode == 0, p.stderr.decode()
