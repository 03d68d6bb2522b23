"""Guest-level tests start from a snapshot instead of a cold boot.

`guest_snapshot` (session scope) boots the default guest once, with a
scratch ext4 disk on virtio-mmio, a raw disk on legacy virtio-pci, a raw
disk on modern virtio-pci with MSI-X (two queues), a read-only disk with an
MBR partition table on a transitional virtio-pci function (Linux binds its
modern side), and (as root) NICs on
taps inside a private network namespace (eth0 on mmio configured from `ip=`
on the command line; eth1 on legacy and eth2 on modern virtio-pci with two
queue pairs, configured at the shell), waits for the shell prompt and takes a Full
snapshot; then it types one command and takes a Diff snapshot on top.  A
cold boot to the shell costs 30-40 s of emulated guest kernel on software
KVM (minutes on a loaded machine); a restore costs milliseconds.

`restored` starts `pyvmm restore ... --resume` from it in a new process,
with private copies of the disks (so tests never share a writable image)
and, when the snapshot has a NIC, in a network namespace of its own with the
host end of the tap configured.  Its `.cmd(text, marker)` types a line at
the guest's shell and waits for `marker` on the console.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vmm import guest
from vmm.testing.console import ConsoleReader

SNAP_TIMEOUT = 1800        # a cold boot on a 2-core machine shared with other jobs
CMD_TIMEOUT = 600         # s for one shell command: minutes when the host is loaded
# NICs of the snapshot (as root): eth0 on virtio-mmio, configured by `ip=`;
# eth1 on legacy virtio-pci and eth2 on modern virtio-pci (MSI-X, two queue
# pairs: multiqueue with its control queue), configured at the shell.
NICS = {"mmio": {"tap": "pvsnap0", "mac": "52:54:00:77:00:02", "guest": "10.77.0.2",
                 "host": "10.77.0.1"},
        "pci-legacy": {"tap": "pvsnap1", "mac": "52:54:00:77:01:02", "guest": "10.77.1.2",
                "host": "10.77.1.1"},
        "pci": {"tap": "pvsnap2", "mac": "52:54:00:77:02:02", "guest": "10.77.2.2",
                "host": "10.77.2.1", "dev": "eth2", "queues": 2}}
# in --drive order; each has its own size, by which tests find it in the guest
DISKS = ("scratch.img", "pci.img", "pci-modern.img", "parts.img")
# MBR of parts.img: two primary Linux partitions, (first sector, sectors)
PARTITIONS = ((2048, 4096), (6144, 8192))
PARTS_SERIAL = "pyvmm-test-disk"
GUEST_IP, HOST_IP = NICS["mmio"]["guest"], NICS["mmio"]["host"]
PROMPT = b"/ # "
VSOCK_CID = 3


def can_net():
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Snapshot:
    def __init__(self, d, has_net):
        self.dir = d
        self.state, self.mem = os.path.join(d, "full.state"), os.path.join(d, "full.mem")
        self.diff_state, self.diff_mem = os.path.join(d, "diff.state"), os.path.join(d, "diff.mem")
        self.disk, self.pci_disk = os.path.join(d, "scratch.img"), os.path.join(d, "pci.img")
        self.modern_disk = os.path.join(d, "pci-modern.img")
        self.parts_disk = os.path.join(d, "parts.img")
        self.has_net = has_net
        self.figures = []
        self.boot_seconds = None
        self.diff_error = None


def make_scratch_ext4(path, size_mb=16):
    subprocess.run(["mkfs.ext4", "-q", "-F", path, f"{size_mb}M"], check=True)


def make_partitioned(path):
    """An 8 MiB image (16384 sectors) with an MBR holding PARTITIONS."""
    import struct
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        entries = b"".join(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, n)
                           for start, n in PARTITIONS)
        f.seek(0x1BE)
        f.write(entries + bytes(32) + b"\x55\xaa")


def shoot(steps, args, has_net, timeout):
    """Run vmm.testing.snapshooter (in a network namespace when the VM has
    NICs); returns (status, console text, stderr text, [snapshot figures])."""
    import json
    cmd = [sys.executable, "-m", "vmm.testing.snapshooter", "--step-timeout", str(timeout)]
    for s in steps:
        cmd += ["--step", s]
    cmd += ["--", *args]
    ns = None
    if has_net:
        from vmm.testing.netns import NetNs
        ns = NetNs()
        cmd = ns.exec_cmd(cmd)
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout + 120, stdin=subprocess.DEVNULL)
    finally:
        if ns is not None:
            ns.delete()
    err = p.stderr.decode(errors="replace")
    figures = [json.loads(line.split(": ", 1)[1]) for line in err.splitlines()
               if line.startswith("snapshooter: {")]
    return p.returncode, p.stdout.decode(errors="replace"), err, figures


def make_snapshot(d):
    """Boot the default guest into directory `d` and snapshot it (Full, then
    Diff on top); returns the Snapshot."""
    snap = Snapshot(d, can_net())
    make_scratch_ext4(snap.disk)
    with open(snap.pci_disk, "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(snap.modern_disk, "wb") as f:
        f.write(os.urandom(3 << 19))            # 3072 sectors: told apart by its size
    make_partitioned(snap.parts_disk)
    cmdline = guest.DEFAULT_CMDLINE
    run_args = ["--drive", f"file={snap.disk}", "--drive", f"file={snap.pci_disk},transport=pci-legacy",
                "--drive", f"file={snap.modern_disk},transport=pci,queues=2",
                # at most 9 devices (vmm/devices.py DEVICE_IRQS): one disk for both
                # the partition table and the transitional function
                "--drive", f"file={snap.parts_disk},transport=pci-transitional,readonly=on,"
                           f"serial={PARTS_SERIAL}",
                # last, so the disks and NICs keep their names: a vsock device
                # (each restore listens on its own uds: Restored.vsock) and virtio-rng
                "--vsock", f"cid={VSOCK_CID},uds={os.path.join(d, 'v.sock')}", "--rng"]
    steps = ["wait:shell ready", "wait:/ # "]
    if snap.has_net:
        cmdline += f" ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
        for t, nic in NICS.items():
            run_args += ["--net", f"tap={nic['tap']},mac={nic['mac']},transport={t}"
                         + (f",queues={nic['queues']}" if "queues" in nic else "")]
        for t in ("pci-legacy", "pci"):
            nic, dev = NICS[t], NICS[t].get("dev", "eth1")
            steps += [f"type:ip addr add {nic['guest']}/24 dev {dev} && ip link set {dev} up && "
                      f"echo {dev}-$((2+3))-up\\n", f"wait:{dev}-5-up", "wait:/ # "]
    steps += ["sleep:1", f"snap:Full:{snap.state}:{snap.mem}", "stop"]
    t0 = time.monotonic()
    rc, out, err, figures = shoot(steps, ["--cmdline", cmdline, *run_args], snap.has_net,
                                  SNAP_TIMEOUT)
    snap.boot_seconds = time.monotonic() - t0
    assert rc == 0 and os.path.exists(snap.state), out[-3000:] + err
    snap.figures = figures
    # The Diff snapshot is taken from a VM restored from the Full one with
    # dirty page tracking on: it holds what changed since the Full snapshot.
    work = os.path.join(d, "diff-run")
    os.mkdir(work)
    args = ["restore", "--snapshot", snap.state, "--mem", snap.mem, "--track-dirty-pages"]
    for name in DISKS:
        shutil.copy(os.path.join(d, name), os.path.join(work, name))
        args += ["--drive", f"file={os.path.join(work, name)}"]
    args += ["--vsock", f"uds={os.path.join(work, 'v.sock')}"]
    if snap.has_net:
        args += [a for nic in NICS.values() for a in ("--net", f"tap={nic['tap']}")]
    steps = ["type:echo diff-was-here > /tmp/diffmark; echo $((6*7))-before-diff\\n",
             "wait:42-before-diff", "wait:/ # ", "sleep:1",
             f"snap:Diff:{snap.diff_state}:{snap.diff_mem}", "stop"]
    rc, out, err, figures = shoot(steps, args, snap.has_net, 600)
    snap.diff_error = None if rc == 0 and os.path.exists(snap.diff_state) else out[-2000:] + err
    snap.figures += figures
    return snap



SHARED = ("boot_seconds", "figures", "diff_error")


@pytest.fixture(scope="session")
def guest_snapshot(tmp_path_factory):
    kernel, initrd = guest.default_guest()
    if not os.path.exists(kernel):
        pytest.fail("default guest not built: run `make guest`")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield make_snapshot(str(tmp_path_factory.mktemp("guest-snapshot")))
        return
    # Under pytest-xdist every worker runs session fixtures once: share one
    # boot between them (pytest-xdist docs, "Making session-scoped fixtures
    # execute only once").  The first worker to take the lock boots and
    # snapshots into the run's common temp directory; the others wait on the
    # lock and then restore from the same files (read-only: restores copy
    # the disks, and map the memory file privately).
    import fcntl
    import json
    root = tmp_path_factory.getbasetemp().parent     # this run's pytest-N, shared by workers
    d, meta = root / "guest-snapshot", root / "guest-snapshot.json"
    with open(root / "guest-snapshot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not meta.exists():
            try:
                shutil.rmtree(d, ignore_errors=True)    # a worker that died mid-boot
                d.mkdir()
                snap = make_snapshot(str(d))
                info = {"ok": True, "has_net": snap.has_net, **{k: getattr(snap, k) for k in SHARED}}
            except BaseException as e:      # the others must not boot again: record why
                info = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                meta.write_text(json.dumps(info))
                raise
            meta.write_text(json.dumps(info))
    info = json.loads(meta.read_text())
    if not info["ok"]:
        pytest.fail("the session snapshot failed in another worker:\n" + info["error"])
    snap = Snapshot(str(d), info["has_net"])
    for k in SHARED:
        setattr(snap, k, info[k])
    yield snap


class Restored:
    """A `pyvmm restore` process from the session snapshot."""

    def __init__(self, snap, tmp, diff=False, extra=(), tty=None, images=None, api=False,
                 vsock=None, drive_opts=None, net_opts=None):
        """images: {name in DISKS: path} to restore with a copy of that image
        instead of the snapshot's; api: serve the control API on self.api_sock;
        vsock: the vsock device's host uds path (default in tmp);
        drive_opts {name in DISKS: ",k=v..."} / net_opts {key of NICS: ",k=v..."}:
        backend options for that disk / NIC (faults=, trace=, pcap=, ...)."""
        self.snap = snap
        self.vsock = vsock or os.path.join(tmp, "v.sock")
        self.api_sock = os.path.join(tmp, "api.sock") if api else None
        self.disk = os.path.join(tmp, "scratch.img")
        self.pci_disk = os.path.join(tmp, "pci.img")
        self.modern_disk = os.path.join(tmp, "pci-modern.img")
        self.parts_disk = os.path.join(tmp, "parts.img")
        state = snap.diff_state if diff else snap.state
        cmd = [sys.executable, "-m", "vmm", "restore", "--snapshot", state, "--mem", snap.mem,
               "--resume", "--timeout", "600", "--vsock", f"uds={self.vsock}", *extra]
        if api:
            cmd += ["--api-sock", self.api_sock]
        for name in DISKS:
            shutil.copy((images or {}).get(name) or os.path.join(snap.dir, name),
                        os.path.join(tmp, name))
            cmd += ["--drive", f"file={os.path.join(tmp, name)}" + (drive_opts or {}).get(name, "")]
        if diff:
            cmd += ["--mem-diff", snap.diff_mem]
        self.ns = None
        if snap.has_net:
            from vmm.testing.netns import NetNs
            self.ns = NetNs()
            for key, nic in NICS.items():
                cmd += ["--net", f"tap={nic['tap']}" + (net_opts or {}).get(key, "")]
            cmd = self.ns.exec_cmd(cmd)
        self.t0 = time.monotonic()
        if tty is None:
            self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            self.console = ConsoleReader(self.p.stdout)
        else:      # an interactive terminal: the test reads the pty's master itself
            self.p = subprocess.Popen(cmd, stdin=tty, stdout=tty, stderr=subprocess.PIPE)
            self.console = None
        if self.ns is not None:
            for nic in NICS.values():
                assert self.ns.wait_link(nic["tap"], 60), "the restored VMM did not open its tap"
                self.ns.ip("addr", "add", f"{nic['host']}/24", "dev", nic["tap"])
                self.ns.ip("link", "set", nic["tap"], "up")

    def type(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def cmd(self, line, marker, timeout=CMD_TIMEOUT):
        self.type(line + "\n")
        ok = self.console.expect(marker.encode(), timeout)
        assert ok, f"no {marker!r} after {line!r}:\n" + self.console.text[-2000:] + self.stderr_now()
        return self.console.text

    def stderr_now(self):
        if self.p.poll() is None:
            return ""
        return self.p.stderr.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait(30)
        return rc, self.p.stderr.read().decode(errors="replace")

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self.ns is not None:
            self.ns.delete()
            self.ns = None


@pytest.fixture
def restored(guest_snapshot, tmp_path):
    """Factory: restored(diff=False, tty=None) -> a running Restored."""
    made = []

    def make(**kw):
        d = tmp_path / f"r{len(made)}"
        d.mkdir()
        r = Restored(guest_snapshot, str(d), **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()
