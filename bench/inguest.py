"""In-guest I/O figures, pyvmm side by side with `qemu-system-x86_64 -M
microvm` (virtio-mmio devices), on the same guest kernel, initramfs, command
line, disk image and tap:

- O_DIRECT reads and writes on the virtio-blk disk, 4 KiB (256 of them) and
  1 MiB (16), sequential (guests/src/iobench.c; writes end with fdatasync);
- TCP throughput guest -> host (4 MiB to a receiver on the host end of the
  tap, timed until it acknowledges the last byte);
- ping round trip guest -> host (busybox ping, 6 pings, the average).

pyvmm runs on its default virtio-mmio transport and on legacy virtio-pci; the
ratio is pyvmm ÷ QEMU for each.  Everything network happens in a private
network namespace (tap pvig0, host end 10.77.0.1/24, guest 10.77.0.2),
deleted at the end, as is the scratch disk image.  QEMU runs with its
defaults for the drive (cache=writeback, aio=threads) and a tap netdev;
pyvmm with its defaults (sync engine, buffered image).

On a host with software KVM (kvm_pvm) the guest kernel runs in an
instruction emulator, so every figure here is bounded by the emulated guest
kernel's own cost per I/O, for both VMMs alike; the ratios, not the
absolute numbers, are what these rows say.

`python -m bench.inguest [--reps N]`.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import RESULTS, have_qemu, qemu_cmd, save, stats
from vmm import guest
from vmm.arch.x86 import cpuid
from vmm.testing.netns import NetNs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAP, HOST_IP, PORT = "pvig0", "10.77.0.1", 5201
DONE = b"pyvmm-guest: done"
SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST_IP}", {PORT}))
s.listen(4)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.sendall(b"k")
    c.close()
"""
DISK_RE = re.compile(rb"iobench: disk (read|write) bs=(\d+) count=(\d+) bytes=(\d+) us=(\d+)")
TCP_RE = re.compile(rb"iobench: tcp send bytes=(\d+) us=(\d+)")
PING_RE = re.compile(rb"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


def build_guest():
    """(vmlinux, initramfs) of this tree's guest (iobench included)."""
    out = subprocess.run(["bash", os.path.join(HERE, "guests", "build.sh")], capture_output=True,
                         text=True, timeout=1800)
    m = re.search(r"^guest: (/\S+)$", out.stdout, re.M)
    if out.returncode or not m:
        raise RuntimeError(f"guests/build.sh failed: {out.stderr[-300:]}")
    return os.path.join(m.group(1), "vmlinux"), os.path.join(m.group(1), "initramfs.cpio")


def parse(text):
    """{figure: value} from one guest's console."""
    out = {}
    for rw, bs, count, nbytes, us in DISK_RE.findall(text):
        size = "4k" if int(bs) == 4096 else "1m"
        secs = int(us) / 1e6
        out[f"disk {rw.decode()} {size}"] = (int(count) / secs if size == "4k"
                                             else int(nbytes) / secs / 1e6)
    m = TCP_RE.search(text)
    if m:
        out["tcp guest->host"] = int(m.group(1)) * 8 / (int(m.group(2)) / 1e6) / 1e6
    m = PING_RE.search(text)
    if m:
        out["ping rtt"] = float(m.group(2))
    return out


def run_vm(cmd, timeout, log_path):
    """Run a VM until DONE is on its console; the console goes to log_path too."""
    t0 = time.monotonic()
    log = open(log_path, "wb")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, cwd=HERE)
    chunks, tail = [], b""
    try:
        fd = p.stdout.fileno()
        import select
        while time.monotonic() - t0 < timeout:
            if not select.select([fd], [], [], 5)[0]:
                if p.poll() is not None:
                    break
                continue
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
            log.write(b)
            log.flush()
            # QEMU's serial can arrive a few bytes per read: look at the
            # tail of everything read, not at the last few chunks (a missed
            # DONE left QEMU, which cannot reboot a microvm, running until
            # the timeout)
            tail = (tail + b)[-len(DONE) - len(b):]
            if DONE in tail:
                break
    finally:
        p.kill()
        p.wait()
        log.close()
    text = b"".join(chunks)
    return text if DONE in text else None, text[-400:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per guest run")
    ap.add_argument("--vmms", default="pyvmm-mmio,qemu,pyvmm-pci")
    ap.add_argument("--total", type=float, default=1380,
                    help="seconds for the whole module: a VM that would not fit is not started "
                         "and counts as failed (the figures so far are still saved)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    kernel, initrd = build_guest()
    base = " ".join(filter(None, [guest.DEFAULT_CMDLINE, cpuid.kernel_args("auto"),
                                  "pyvmm.test=iobench"]))
    tmp = tempfile.mkdtemp(prefix="pyvmm-inguest-")
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    vmms = [v for v in args.vmms.split(",") if v != "qemu" or have_qemu()]
    samples, skipped = {}, []
    server = None
    print(f"  guest {kernel}, consoles in {RESULTS}/inguest-*.console.txt", flush=True)
    try:
        with NetNs("pyvmm-ig") as ns:
            ns.ip("tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
            ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
            ns.ip("link", "set", TAP, "up")
            server = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", SERVER],
                                      stdin=subprocess.DEVNULL)
            inns = ["ip", "netns", "exec", ns.name]
            for _ in range(args.reps):
                for vmm in vmms:
                    left = t_start + args.total - time.monotonic()
                    if left < 180:
                        print(f"  {vmm}: not started, {left:.0f} s left of --total", flush=True)
                        for k in ("disk read 4k", "disk write 4k", "disk read 1m", "disk write 1m",
                                  "tcp guest->host", "ping rtt"):
                            samples.setdefault(k, {}).setdefault(vmm, []).append(None)
                        skipped.append(vmm)
                        continue
                    if vmm == "qemu":
                        cmd = qemu_cmd(kernel, initrd, base) + [
                            "-drive", f"file={img},format=raw,if=none,id=d0",
                            "-device", "virtio-blk-device,drive=d0",
                            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                            "-device", "virtio-net-device,netdev=n0"]
                    else:
                        tr = vmm.split("-")[1]
                        cmd = [sys.executable, "-m", "vmm", "run", "--kernel", kernel,
                               "--initrd", initrd, "--mem", "256M", "--cmdline", base,
                               "--drive", f"file={img},transport={tr}",
                               "--net", f"tap={TAP},transport={tr}",
                               "--timeout", str(int(args.timeout))]
                        if cpuid.kernel_args("auto"):
                            cmd += ["--cpu-template", "host"]   # the args are in `base` already
                    os.makedirs(RESULTS, exist_ok=True)
                    text, tail = run_vm(inns + cmd, min(args.timeout, left - 30),
                                        os.path.join(RESULTS, f"inguest-{vmm}.console.txt"))
                    got = parse(text) if text else {}
                    if not text:
                        print(f"  {vmm}: guest did not finish: ...{tail[-200:]!r}", file=sys.stderr)
                    for k in ("disk read 4k", "disk write 4k", "disk read 1m", "disk write 1m",
                              "tcp guest->host", "ping rtt"):
                        samples.setdefault(k, {}).setdefault(vmm, []).append(got.get(k))
                    print(f"  {vmm}: {got}", flush=True)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"what": "in-guest figures (guests/src/iobench.c, busybox ping), same guest under "
                   "each VMM; bounded by the emulated guest kernel on software KVM",
           "units": {"disk read 4k": "IOPS", "disk write 4k": "IOPS", "disk read 1m": "MB/s",
                     "disk write 1m": "MB/s", "tcp guest->host": "Mbit/s", "ping rtt": "ms"},
           "figures": {k: {v: (stats(s) or {"failed": len(s)}) for v, s in per.items()}
                       for k, per in samples.items()},
           "not_started_for_time": skipped}
    print("saved", save("inguest", res))
    return res


if __name__ == "__main__":
    main()
