"""In-guest I/O figures, pyvmm side by side with `qemu-system-x86_64 -M
microvm` (virtio-mmio devices), on the same guest kernel, initramfs, command
line, disk image and tap:

- O_DIRECT reads and writes on the virtio-blk disk, 4 KiB (256 of them) and
  1 MiB (32 reads, 16 writes), sequential (guests/src/iobench.c; writes end
  with fdatasync); 1 MiB reads are taken per read (each read's own time,
  all reads of all runs pooled: min / median / max over them), the others
  per run;
- TCP throughput guest -> host (4 MiB to a receiver on the host end of the
  tap, timed until it acknowledges the last byte);
- ping round trip guest -> host (busybox ping, 21 pings 0.2 s apart; every
  reply but the first, which waits for ARP, of all runs pooled: min /
  median / max over them).  A run's mean over 6 pings, the first one
  included, moved 17.6-21.0 ms between QEMU's own runs.

Guest interrupts per operation (its own /proc/interrupts around the 1 MiB
reads and the pings: virtio lines summed, the local timer apart) are kept
beside the figures: the guest kernel is emulated here, so an interrupt more
per operation would be a VMM cost the guest pays in full.

pyvmm runs on its default virtio-mmio transport and on legacy virtio-pci; the
ratio is pyvmm ÷ QEMU for each.  The VMMs take turns, boot by boot, in an
order that reverses every rep, so a change in the host's load meets both.  Everything network happens in a private
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
import statistics
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
PING_LINE_RE = re.compile(rb"seq=(\d+) ttl=\d+ time=([\d.]+) ms")
EACH_RE = re.compile(rb"iobench: disk (read|write) bs=(\d+) count=\d+ bytes=\d+ us=\d+ "
                     rb"each_us=([\d,]+)")
IRQS_RE = re.compile(rb"iobench: irqs (\S+)\r?\n(.*?)iobench: irqs end", re.S)
# guest interrupts counted around a phase (guests/initramfs/etc/rc): phase,
# and how many operations it does (per-operation counts)
IRQ_PHASES = {"read1m": 32, "ping": 21}
POOLED = ("disk read 1m", "ping rtt")     # figures whose samples are single transfers / pings
FIGURES = ("disk read 4k", "disk write 4k", "disk read 1m", "disk write 1m", "tcp guest->host",
           "ping rtt")


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
    # pooled figures: a list of samples (one per read, one per ping reply)
    for rw, bs, each in EACH_RE.findall(text):
        if rw == b"read" and int(bs) == 1 << 20:
            out["disk read 1m"] = [int(bs) / (int(us) / 1e6) / 1e6
                                   for us in each.split(b",") if int(us) > 0]
    pings = [float(t) for seq, t in PING_LINE_RE.findall(text) if int(seq) > 0]
    if pings:
        out["ping rtt"] = pings
    elif PING_RE.search(text):          # an older guest: only ping's own summary
        out["ping rtt"] = [float(PING_RE.search(text).group(2))]
    return out


def irq_counts(text):
    """{tag: {"virtio": n, "timer": n}} from the guest's /proc/interrupts
    lines printed around a phase: every virtio interrupt line summed, LOC
    (the local timer) apart; counts summed over the guest's CPUs."""
    out = {}
    for tag, body in IRQS_RE.findall(text):
        c = {"virtio": 0, "timer": 0}
        for line in body.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[0].endswith(":"):
                continue
            n = sum(int(x) for x in parts[1:] if x.isdigit() and len(x) < 19)
            c["timer" if parts[0] == "LOC:" else "virtio"] += n
        out[tag.decode()] = c
    return out


def irqs_per_op(text):
    """{phase: {"virtio": per op, "timer": per op}} from irq_counts()."""
    c, out = irq_counts(text), {}
    for phase, ops in IRQ_PHASES.items():
        a, b = c.get(f"before-{phase}"), c.get(f"after-{phase}")
        if a and b:
            out[phase] = {k: (b[k] - a[k]) / ops for k in a}
    return out


def summary(v):
    """A figure for the progress line: a number, or a pooled list's median (n)."""
    if isinstance(v, list):
        return f"{statistics.median(v):.3g} (median of {len(v)})" if v else "none"
    return f"{v:.3g}"


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
    samples, skipped, irqs = {}, [], {}
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
            for rep in range(args.reps):
                for vmm in (vmms if rep % 2 == 0 else vmms[::-1]):
                    left = t_start + args.total - time.monotonic()
                    if left < 180:
                        print(f"  {vmm}: not started, {left:.0f} s left of --total", flush=True)
                        for k in FIGURES:
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
                    for phase, per_op in (irqs_per_op(text) if text else {}).items():
                        for k, v in per_op.items():
                            irqs.setdefault(phase, {}).setdefault(k, {}).setdefault(
                                vmm, []).append(v)
                        print(f"  {vmm}: guest interrupts per {phase} operation: " +
                              ", ".join(f"{k} {v:.2f}" for k, v in per_op.items()), flush=True)
                    for k in FIGURES:
                        v = got.get(k)
                        per = samples.setdefault(k, {}).setdefault(vmm, [])
                        per.extend(v) if isinstance(v, list) else per.append(v)
                    print(f"  {vmm}: " + ", ".join(
                        f"{k} {summary(v)}" for k, v in got.items()), flush=True)
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
           "pooled": {k: "one sample per " + ("1 MiB read" if k.startswith("disk") else
                                              "ping reply (the first of each run left out)")
                      for k in POOLED},
           "guest_irqs_per_op": {
               "what": "guest interrupts (its /proc/interrupts: virtio lines summed; timer = "
                       "LOC) per operation of a phase: read1m = per 1 MiB O_DIRECT read, "
                       "ping = per ping sent (replies wait 0.2 s apart)",
               "phases": {ph: {k: {v: stats(xs) for v, xs in per.items()} for k, per in d.items()}
                          for ph, d in irqs.items()}},
           "not_started_for_time": skipped}
    print("saved", save("inguest", res))
    return res


if __name__ == "__main__":
    main()
