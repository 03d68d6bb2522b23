"""Command line: `pyvmm run ...`.  Errors are one line on stderr and a
non-zero exit status; no tracebacks for bad input."""
import os
import sys

from vmm import guest
from vmm import log as vmmlog
from vmm.arch.x86.cpuid import TEMPLATES, CpuidError
from vmm.arch.x86.loader import KernelError
from vmm.devices import DeviceSpecError, DriveSpec, NetSpec, RngSpec, VsockSpec
from vmm.kvm.system import KvmUnavailable
from vmm.machine import STATUS, Machine, MachineConfig
from vmm.memory import GuestMemoryError
from vmm.native import NativeError
from vmm.seccomp import SeccompError

EXIT_USAGE = 2
EXIT_ERROR = 1

STATUS_HELP = """exit status:
  0    the guest powered off or rebooted, or the quit key was pressed
  1    pyvmm could not start or run the VM (the reason is printed)
  2    bad command line
  3    the guest kernel panicked (pvpanic)
  4    the guest crashed: triple fault, KVM internal error, entry failure
  124  --timeout expired
  130  pyvmm was stopped by SIGINT, SIGTERM or SIGHUP

console: with stdin a terminal it is put in raw mode; type Ctrl-a x to quit,
Ctrl-a Ctrl-a to send Ctrl-a to the guest."""


class UsageError(Exception):
    pass


SIZE_SHIFT = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text):
    """'256M', '1G', '512K' -> bytes; a bare number is MiB (as QEMU's -m)."""
    # The usual spellings (64M, 2G, 512MiB, 1024) without loading re: the
    # same answer as the pattern below, which decides everything else.
    digits = text.rstrip("BbIi")
    unit = digits[-1:].upper() if digits[-1:].isalpha() else ""
    digits = digits[:-1] if unit else digits
    if (digits and len(digits) <= 12 and all(c in "0123456789" for c in digits)
            and unit in SIZE_SHIFT and text[len(digits) + len(unit):].upper() in ("", "B", "IB")):
        return int(digits) << SIZE_SHIFT[unit]
    import argparse
    import re
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 256M or 2G)")
    return int(m.group(1)) << SIZE_SHIFT[m.group(2).upper()]


def build_parser():
    """The whole command line's argparse parser (argparse and the help
    formatters load here: `pyvmm run` with plain options never needs them)."""
    import argparse
    from vmm.clihelp import RawDescriptionHelpFormatter

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_USAGE, f"pyvmm: {message}\n")

    p = Parser(prog="pyvmm", description="A small virtual machine monitor on Linux KVM.",
               formatter_class=RawDescriptionHelpFormatter, epilog=STATUS_HELP)
    p.add_argument("--version", action="version", version="pyvmm 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="boot a Linux kernel",
                       formatter_class=RawDescriptionHelpFormatter, epilog=STATUS_HELP,
                       description="Boot a Linux kernel (bzImage or ELF vmlinux). Without "
                                   "--kernel, boots the default guest built by `make guest`.")
    add_run_arguments(r)
    from vmm.api.cli import API_HELP, add_api_arguments
    a = sub.add_parser("api", help="run a VM driven by the Firecracker-compatible API",
                       formatter_class=RawDescriptionHelpFormatter,
                       description=API_HELP, epilog=STATUS_HELP)
    add_api_arguments(a)
    add_restore_parser(sub)
    return p


def add_run_arguments(r):
    """`pyvmm run`'s options, on an argparse parser or on fastargs.Recorder
    (the same calls feed both; see fast_parse)."""
    r.add_argument("--kernel", metavar="PATH", help="kernel image: bzImage or ELF vmlinux")
    r.add_argument("--initrd", metavar="PATH", help="initial ramdisk (cpio archive)")
    r.add_argument("--cmdline", metavar="STRING",
                   help=f"kernel command line (default: {guest.DEFAULT_CMDLINE!r}); "
                        "device parameters such as virtio_mmio.device= are appended")
    r.add_argument("--mem", metavar="SIZE", type=parse_size, default=256 << 20,
                   help="guest RAM, e.g. 256M or 2G; a bare number means MiB (default 256M)")
    r.add_argument("--cpus", metavar="N", type=int, default=1, help="number of vCPUs (default 1)")
    r.add_argument("--cpu-template", choices=TEMPLATES, default="auto",
                   help="CPUID template: host passes through KVM's CPUID, minimal hides "
                        "CX16/POPCNT/XSAVE/SMEP/SMAP, auto picks minimal on software KVM "
                        "(default auto)")
    r.add_argument("--serial", metavar="stdio|file:PATH", default="stdio",
                   help="where the guest's serial console goes (default stdio)")
    r.add_argument("--timeout", metavar="SECONDS", type=float,
                   help="stop the guest after this many seconds (exit status 124)")
    r.add_argument("--drive", metavar="file=PATH[,readonly=on][,serial=S][,transport=T][,queues=N]",
                   action="append", default=[],
                   help="a virtio-blk disk backed by a raw image file (repeatable; the first "
                        "is /dev/vda); the image is locked against a second VMM and flushed "
                        "and closed on every exit; transport=mmio (default, announced on "
                        "the kernel command line), pci (modern virtio-pci with MSI-X, found by "
                        "bus scan), pci-legacy (legacy virtio-pci, INTx) or pci-transitional "
                        "(both on one function); queues=N (1-8) request queues (VIRTIO_BLK_F_MQ)")
    r.add_argument("--net", metavar="tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,transport=T][,queues=N]",
                   action="append", default=[],
                   help="a virtio-net NIC on a tap interface (repeatable; the first is eth0); "
                        "the tap is created if absent and then removed on exit; nothing is "
                        "configured on the host side; transport as for --drive; queues=N (1-8) "
                        "queue pairs on a multi-queue tap (VIRTIO_NET_F_MQ, control queue)")
    r.add_argument("--vsock", metavar="cid=N,uds=PATH[,transport=mmio|pci|pci-legacy]", action="append",
                   default=[],
                   help="a virtio-vsock device (guest CID default 3) with Firecracker's host "
                        "side: host programs connect to the Unix socket PATH and write "
                        "'CONNECT <port>\\n'; guest connections to CID 2 port P go to PATH_P")
    r.add_argument("--rng", metavar="[bw=SIZE:REFILL_MS][,ops=N:REFILL_MS][,transport=mmio|pci]",
                   nargs="?", const="", default=None,
                   help="a virtio-rng entropy device fed by getrandom(2), optionally rate "
                        "limited (token buckets, Firecracker semantics)")
    r.add_argument("--trace-exits", metavar="FILE",
                   help="write every port I/O and MMIO exit (address, size, direction, "
                        "device) as one JSON line to FILE")
    r.add_argument("--track-dirty-pages", action="store_true",
                   help="turn on KVM's dirty page log so Diff snapshots can be taken")
    r.add_argument("--no-seccomp", action="store_true",
                   help="do not confine the VMM's threads with seccomp filters (for debugging; "
                        "see README, Security)")
    r.add_argument("--debug", action="store_true",
                   help="log unhandled port/MMIO accesses and VMM internals to stderr")
    r.add_argument("--api-sock", metavar="PATH",
                   help="also serve the Firecracker-compatible control API on this Unix socket "
                        "(pause/resume, inspect, swap drives of this VM)")


def add_restore_parser(sub):
    from vmm.clihelp import HelpFormatter, RawDescriptionHelpFormatter
    r = sub.add_parser("restore", help="continue a VM from a snapshot",
                       formatter_class=RawDescriptionHelpFormatter, epilog=STATUS_HELP,
                       description="Rebuild a VM in this process from a snapshot's state file "
                                   "and memory file (mapped copy-on-write, never modified) and "
                                   "continue it.  Disks and taps are reopened at the paths the "
                                   "snapshot names unless overridden.")
    r.add_argument("--snapshot", metavar="PATH", required=True, help="the state file")
    r.add_argument("--mem", metavar="PATH", required=True,
                   help="the memory file (for a Diff snapshot: its base's full memory file)")
    r.add_argument("--mem-diff", metavar="PATH",
                   help="a Diff snapshot's own memory file, applied over --mem")
    r.add_argument("--resume", action="store_true",
                   help="run the guest at once (otherwise it waits, paused, for the API)")
    r.add_argument("--drive", metavar="file=PATH", action="append", default=[],
                   help="replace the backing file of the snapshot's disks, in order (the "
                        "first --drive replaces the first disk); the image must have the same "
                        "size; other options stay as in the snapshot")
    r.add_argument("--net", metavar="tap=NAME", action="append", default=[],
                   help="use another tap for the snapshot's NICs, in order (the MAC stays)")
    r.add_argument("--vsock", metavar="uds=PATH", action="append", default=[],
                   help="listen on another uds path for the snapshot's vsock device (e.g. a "
                        "second clone of one snapshot); the guest CID stays")
    r.add_argument("--serial", metavar="stdio|file:PATH", default="stdio",
                   help="where the guest's serial console goes (default stdio)")
    r.add_argument("--timeout", metavar="SECONDS", type=float,
                   help="stop the guest after this many seconds (exit status 124)")
    r.add_argument("--track-dirty-pages", action="store_true",
                   help="log dirty pages from here on (for a Diff snapshot of the restored VM)")
    r.add_argument("--api-sock", metavar="PATH",
                   help="serve the control API on this Unix socket (resume, pause, snapshot)")
    r.add_argument("--no-seccomp", action="store_true",
                   help="do not confine the VMM's threads with seccomp filters (for debugging)")
    s = sub.add_parser("snapshot", help="snapshot a running VM through its API socket",
                       formatter_class=HelpFormatter,
                       description="Pause the VM served on --api-sock (pyvmm run/restore/api "
                                   "--api-sock), write its state and memory files, and resume it "
                                   "unless --leave-paused.")
    s.add_argument("--api-sock", metavar="PATH", required=True)
    s.add_argument("--snapshot", metavar="PATH", required=True, help="state file to write")
    s.add_argument("--mem", metavar="PATH", required=True, help="memory file to write")
    s.add_argument("--type", choices=("Full", "Diff"), default="Full",
                   help="Diff: only pages changed since the last snapshot (VM started with "
                        "--track-dirty-pages)")
    s.add_argument("--leave-paused", action="store_true", help="do not resume the VM afterwards")
    s.add_argument("--debug", action="store_true")
    b = sub.add_parser("snapshot-rebase", help="merge a Diff snapshot's memory into its base",
                       formatter_class=HelpFormatter,
                       description="Write BASE's memory with the pages of the Diff snapshot "
                                   "(--diff-snapshot/--diff-mem) copied over it, to --out (default: "
                                   "replace --base; a VM still mapping the old file is not "
                                   "affected).  Restore a Diff taken on top of another Diff with "
                                   "--mem set to its base rebased with every earlier diff, in order.")
    b.add_argument("--base", metavar="PATH", required=True,
                   help="the memory file the diff was taken over (a Full one, or one rebased before)")
    b.add_argument("--diff-snapshot", metavar="PATH", required=True, help="the diff's state file")
    b.add_argument("--diff-mem", metavar="PATH", required=True, help="the diff's memory file")
    b.add_argument("--out", metavar="PATH", help="write the merged memory file here")
    b.add_argument("--debug", action="store_true")
    r.add_argument("--debug", action="store_true", help="log VMM internals to stderr")


def open_serial(spec):
    if spec.startswith("file:"):
        path = spec[5:]
        try:
            return open(path, "wb", buffering=0)
        except OSError as e:
            raise UsageError(f"cannot open serial output {path}: {e.strerror}") from None
    if spec != "stdio":
        raise UsageError(f"--serial must be stdio or file:PATH, not {spec!r}")
    return None


def restore_config(args):
    """MachineConfig for `pyvmm restore`: everything checked (state file,
    memory file size, disks) before a VM is built."""
    from vmm import snapshot
    from vmm.devices import spec_from_options
    restore = snapshot.load(args.snapshot, args.mem, args.mem_diff)
    saved = restore.device_options()
    drives = [i for i, o in enumerate(saved) if o.get("kind") == "drive"]
    nics = [i for i, o in enumerate(saved) if o.get("kind") == "net"]
    socks = [i for i, o in enumerate(saved) if o.get("kind") == "vsock"]
    if len(args.drive) > len(drives) or len(args.net) > len(nics):
        raise UsageError(f"the snapshot has {len(drives)} disks and {len(nics)} NICs; "
                         f"more --drive/--net overrides were given")
    if len(args.vsock) > len(socks):
        raise UsageError(f"the snapshot has {len(socks)} vsock devices; more --vsock were given")
    overrides = dict(zip(drives, args.drive))
    overrides.update(zip(nics, args.net))
    overrides.update(zip(socks, args.vsock))
    devices = [spec_from_options(o, overrides.get(i)) for i, o in enumerate(saved)]
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    st = restore.state
    return MachineConfig(kernel="", cmdline=st.get("cmdline", ""), mem_size=int(st["mem_size"]),
                         cpus=len(st["vcpus"]), devices=devices, serial_out=open_serial(args.serial),
                         timeout=args.timeout, track_dirty_pages=args.track_dirty_pages,
                         restore=restore, seccomp=not args.no_seccomp)


def config_from_args(args):
    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        kernel, default_initrd = guest.default_guest()
        if not os.path.exists(kernel):
            raise UsageError("no --kernel given and no default guest built: run `make guest`")
        initrd = initrd or default_initrd
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{what} {path}: no such file")
    if not (args.serial.startswith("file:") or args.serial == "stdio"):
        raise UsageError(f"--serial must be stdio or file:PATH, not {args.serial!r}")
    if args.timeout is not None and not (0 < args.timeout < float("inf")):   # NaN fails too
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    devices = [DriveSpec(d) for d in args.drive] + [NetSpec(n) for n in args.net]
    if len(args.vsock) > 1:
        raise UsageError("--vsock: at most one vsock device")
    devices += [VsockSpec(v) for v in args.vsock]
    if args.rng is not None:
        devices.append(RngSpec(args.rng))
    if args.trace_exits:
        from vmm.virtio.trace import ExitTraceSpec
        devices.append(ExitTraceSpec(args.trace_exits))
    serial_out = None       # opened last: nothing after it can fail and leak it
    if args.serial.startswith("file:"):
        path = args.serial[5:]
        try:
            serial_out = open(path, "wb", buffering=0)
        except OSError as e:
            raise UsageError(f"cannot open serial output {path}: {e.strerror}") from None
    return MachineConfig(kernel=kernel, initrd=initrd, devices=devices,
                         cmdline=args.cmdline if args.cmdline is not None else guest.DEFAULT_CMDLINE,
                         mem_size=args.mem, cpus=args.cpus, cpu_template=args.cpu_template,
                         serial_out=serial_out, timeout=args.timeout,
                         track_dirty_pages=args.track_dirty_pages,
                         seccomp=not args.no_seccomp)


def run(args):
    from vmm import console
    if args.command == "restore":
        if not args.resume and not args.api_sock:
            raise UsageError("restore without --resume leaves the VM paused: give --resume, or "
                             "--api-sock to resume it through the API")
        vmmlog.load()       # vmm.snapshot and the devices log through logging
        config = restore_config(args)
    else:
        config = config_from_args(args)
        if config.devices or args.api_sock:     # their modules log through logging
            vmmlog.load()
    server = None
    try:
        machine = Machine(config)
        if _gc_paused:          # on again for the VM's life (vmm/__main__.py)
            import gc
            gc.enable()
        try:
            if config.seccomp:          # the API thread confines itself when it starts
                from vmm import seccomp
                seccomp.enable()
            if args.api_sock:
                server = _serve_api(args.api_sock, machine)
            vmmlog.settle()     # before any thread is confined (seccomp)
            # the input thread starts once the vCPUs run: not on the way to
            # the guest's first instruction
            with console.Console(machine, start=False) as con:
                status = machine.run(start_paused=args.command == "restore" and not args.resume,
                                     started=con.start)
        finally:
            if server is not None:
                server.close()
            machine.close()
    finally:
        if config.serial_out is not None:
            config.serial_out.close()
    if machine.stop_reason not in ("poweroff", "reset", "quit") or args.debug:
        print(f"pyvmm: {machine.stop_message or machine.stop_reason}", file=sys.stderr)
    return status


def _serve_api(path, machine):
    """The control API for a VM started with `pyvmm run` flags."""
    from vmm.api.controller import Controller
    from vmm.api.server import ApiServer
    from vmm.vmconfig import VmConfig
    ctl = Controller(config=VmConfig.from_machine_config(machine.config))
    ctl.attach(machine)
    server = ApiServer(path, ctl.handle, tick=ctl.tick)
    server.start()
    return server


def fast_parse(argv):
    """`pyvmm run`'s command line as argparse would parse it, without loading
    argparse (vmm/fastargs.py); None when only argparse can answer."""
    if argv[:1] != ["run"]:
        return None
    from vmm import fastargs
    rec = fastargs.Recorder()
    add_run_arguments(rec)
    return fastargs.parse(rec, argv[1:], command="run")


_gc_paused = False     # vmm.__main__ turned the cyclic GC off for the start-up


def main(argv=None, gc_paused=False):
    global _gc_paused
    _gc_paused = gc_paused
    argv = sys.argv[1:] if argv is None else list(argv)
    args = fast_parse(argv)
    if args is None:
        parser = build_parser()
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "api":
        from vmm.api.cli import run_api
        return guarded(run_api, args)
    if args.command == "snapshot":
        return guarded(snapshot_command, args)
    if args.command == "snapshot-rebase":
        return guarded(rebase_command, args)
    return guarded(run, args)


def snapshot_command(args):
    """`pyvmm snapshot`: PATCH /vm Paused, PUT /snapshot/create, PATCH /vm
    Resumed, as a user would with curl."""
    from vmm.api.client import ApiClient, ApiRequestError
    from vmm.snapshot import SnapshotError
    try:
        with ApiClient(args.api_sock, timeout=600) as api:
            was = api.get("/")["state"]
            api.patch("/vm", {"state": "Paused"})
            try:
                api.put("/snapshot/create", {"snapshot_type": args.type,
                                             "snapshot_path": os.path.abspath(args.snapshot),
                                             "mem_file_path": os.path.abspath(args.mem)})
            finally:
                if was == "Running" and not args.leave_paused:
                    api.patch("/vm", {"state": "Resumed"})
    except ApiRequestError as e:
        raise SnapshotError(e.message) from None
    except OSError as e:
        raise SnapshotError(f"cannot reach the API socket {args.api_sock}: "
                            f"{e.strerror or e}") from None
    return 0


def rebase_command(args):
    from vmm import snapshot
    pages = snapshot.rebase(args.base, args.diff_snapshot, args.diff_mem, args.out)
    print(f"pyvmm: {pages} pages of {args.diff_mem} applied onto {args.base} -> "
          f"{args.out or args.base}", file=sys.stderr)
    return 0


def guarded(fn, args):
    """Run a command; bad input and VMM errors become one line on stderr."""
    # logging loads here with --debug; otherwise when a module that uses it
    # does (vmm/log.py): a plain run never needs it
    vmmlog.configure(bool(getattr(args, "debug", False)))
    try:
        return fn(args)
    except KeyboardInterrupt:
        return STATUS["signal"]
    except Exception as e:
        code = error_status(e)
        if code is not None:
            print(f"pyvmm: {e}", file=sys.stderr)
            return code
        # a bug of ours: one line for users, the traceback with --debug
        if getattr(args, "debug", False):
            import traceback
            traceback.print_exc()
        print(f"pyvmm: internal error: {type(e).__name__}: {e}"
              + ("" if getattr(args, "debug", False) else " (--debug shows the traceback)"),
              file=sys.stderr)
        return EXIT_ERROR


def error_status(e):
    """The exit status for an expected error (printed as one line), or None
    for a bug (shown with its traceback)."""
    # Not imported here (start-up cost; and once the main thread is confined a
    # first import would end the VMM with SIGSYS): an error of a module that
    # was never loaded cannot be the one being handled.
    def loaded(module, name):
        m = sys.modules.get(module)
        return getattr(m, name) if m is not None else ()

    if isinstance(e, (UsageError, DeviceSpecError) + (loaded("vmm.vmconfig", "ConfigError"),)):
        return EXIT_USAGE
    if isinstance(e, (KernelError, KvmUnavailable, CpuidError, GuestMemoryError, NativeError,
                      ValueError, MemoryError, OSError, SeccompError)
                  + tuple(loaded(m, n) for m, n in (
                      ("vmm.api.listen", "ApiSocketError"), ("vmm.virtio.device", "VirtioError"),
                      ("vmm.snapshot", "SnapshotError"), ("vmm.kvm.state", "StateError")))):
        return EXIT_ERROR
    return None


if __name__ == "__main__":
    sys.exit(main())
