"""Command-line device specs and how they attach to a Machine.

`--drive file=PATH[,readonly=on][,serial=S][,transport=T][,queues=N][,io_engine=E]` becomes
a DriveSpec, `--net tap=NAME[,mac=M][,transport=T][,queues=N]` a NetSpec
(T: mmio, pci, pci-legacy or pci-transitional); attach() opens the device and
wires it on its transport (vmm.devices for mmio, vmm.virtio.pci_attach for
legacy, modern and transitional virtio-pci),
returning the kernel command line with whatever the transport needs announced.
"""
import os
import stat

from vmm.arch.x86 import layout as L

# ISA IRQs free for devices (4 is COM1; 1, 8, 12 and 13 are taken on a PC),
# in the order kvmtool and Firecracker hand them out.
DEVICE_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 3)
# pci: modern virtio-pci with MSI-X (virtio 1.1 §4.1); pci-legacy: the 0.9.5
# interface with INTx; pci-transitional: both on one function (QEMU's default).
TRANSPORTS = ("mmio", "pci", "pci-legacy", "pci-transitional")
MAX_QUEUES = 8          # queues=N: virtio-blk queues / virtio-net queue pairs


class DeviceSpecError(ValueError):
    pass


def parse_options(text, what, known):
    """'k=v,k=v' -> dict, rejecting unknown keys and repeats."""
    opts = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise DeviceSpecError(f"{what}: expected key=value, got {part!r}")
        if key not in known:
            raise DeviceSpecError(f"{what}: unknown option {key!r} (known: {', '.join(known)})")
        if key in opts:
            raise DeviceSpecError(f"{what}: {key} given twice")
        opts[key] = value
    return opts


def parse_bool(value, what):
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise DeviceSpecError(f"{what}: expected on or off, got {value!r}")


def is_block_device(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def parse_queues(value, what):
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_QUEUES:
        raise DeviceSpecError(f"{what}: queues must be a number from 1 to {MAX_QUEUES}, not {value!r}")
    return n


class Slots:
    """MMIO windows and IRQ lines handed out to devices in order."""

    def __init__(self):
        self.next_window = 0
        self.next_irq = 0

    def take_irq(self):
        if self.next_irq >= len(DEVICE_IRQS):
            raise DeviceSpecError(f"too many devices (at most {len(DEVICE_IRQS)})")
        self.next_irq += 1
        return DEVICE_IRQS[self.next_irq - 1]

    def take(self):
        """(window base, irq) for a virtio-mmio device."""
        irq = self.take_irq()
        base = L.VIRTIO_MMIO_BASE + self.next_window * L.VIRTIO_MMIO_SIZE
        self.next_window += 1
        return base, irq


class VirtioMmioAttachment:
    """A virtio device on a virtio-mmio window: the window on the MMIO bus,
    the interrupt as a KVM irqfd, queue notifications as ioeventfds, and a
    virtio_mmio.device= kernel parameter to announce it (the counterpart of
    vmm.virtio.pci_attach.VirtioPciAttachment)."""

    def __init__(self, open_device):
        self.open_device = open_device
        self.transport = None
        self._irq_fd = None

    def attach(self, machine, cmdline):
        from vmm.virtio import VirtioMmio
        base, irq = machine.slots.take()
        device = self.open_device()
        vm = machine.vm
        try:
            self._irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vm.irqfd(self._irq_fd, irq)
            self.transport = VirtioMmio(
                device, machine.memory, irq=self._irq_fd, ioloop=machine.ioloop(),
                register_ioeventfd=lambda fd, off, n, dm: vm.ioeventfd(fd, base + off, n,
                                                                      datamatch=dm))
        except BaseException:
            device.close()
            raise
        machine.mmio_bus.register(base, VirtioMmio.WINDOW, self.transport)
        return f"{cmdline} {VirtioMmio.cmdline(base, irq)}"

    def close(self):
        if self.transport is not None:
            self.transport.close()          # flushes and closes the backend
            self.transport = None
        if self._irq_fd is not None:
            os.close(self._irq_fd)
            self._irq_fd = None


class VirtioSpec:
    """A virtio device given on the command line, attached on the transport
    its `transport=` option names (mmio by default: no bus enumeration, the
    fastest boot, what the default guest and microVM kernels use; pci for
    guests that only have virtio-pci drivers)."""

    slow = {}       # slow-path settings (faults, tracing, hooks, limiters): none
    append_traces = False   # a restore adds to the trace/pcap files instead of truncating

    def __init__(self, opts, what):
        self.transport_name = opts.get("transport", "mmio")
        if self.transport_name not in TRANSPORTS:
            raise DeviceSpecError(f"{what}: unknown transport {self.transport_name!r} "
                                  f"(available: {', '.join(TRANSPORTS)})")
        self.queues = parse_queues(opts.get("queues", "1"), what)
        self._attachment = None

    @property
    def transport(self):
        return None if self._attachment is None else self._attachment.transport

    @property
    def device(self):
        """The open virtio device once attached (None before)."""
        t = self.transport
        return None if t is None else t.device

    def open_device(self):
        raise NotImplementedError

    def attach(self, machine, cmdline):
        if self.transport_name == "pci-legacy":
            from vmm.virtio.pci_attach import VirtioPciAttachment
            self._attachment = VirtioPciAttachment(self.open_device)
        elif self.transport_name in ("pci", "pci-transitional"):
            from vmm.virtio.pci_attach import VirtioPciModernAttachment
            self._attachment = VirtioPciModernAttachment(
                self.open_device, transitional=self.transport_name == "pci-transitional")
        else:
            self._attachment = VirtioMmioAttachment(self.open_device)
        return self._attachment.attach(machine, cmdline)

    def close(self):
        if self._attachment is not None:
            self._attachment.close()
            self._attachment = None


class DriveSpec(VirtioSpec):
    """`--drive file=PATH[,readonly=on][,serial=S][,transport=...][,queues=N]` plus the
    slow-path options (README "Fault injection and tracing", "Entropy and
    rate limiters"): faults=SPEC, trace=FILE, hook=SOURCE:NAME,
    bw=SIZE:REFILL_MS[:BURST], ops=N:REFILL_MS[:BURST]."""
    KEYS = ("file", "readonly", "serial", "transport", "queues", "faults", "trace", "hook", "bw", "ops",
            "io_engine", "poll_us")
    IO_ENGINES = ("sync", "io_uring")   # Firecracker's io_engine Sync / Async

    def __init__(self, text):
        opts = parse_options(text, "--drive", self.KEYS)
        super().__init__(opts, "--drive")
        if "file" not in opts:
            raise DeviceSpecError("--drive: file=PATH is required")
        self.path = opts["file"]
        self.readonly = parse_bool(opts.get("readonly", "off"), "--drive readonly")
        self.serial = opts.get("serial")
        if self.serial is not None and len(self.serial.encode()) > 20:
            raise DeviceSpecError("--drive: serial is at most 20 bytes (virtio-blk GET_ID)")
        if not (os.path.isfile(self.path) or is_block_device(self.path)):
            raise DeviceSpecError(f"--drive: disk image {self.path}: no such file")
        self.slow = _slow_options(opts, "--drive", faults="disk", limiters=(("bw", "ops"),))
        _single_queue(self, "--drive")
        self.io_engine = opts.get("io_engine", "sync")
        # adaptive polling of the I/O thread's C fast path (README "I/O thread fast path")
        try:
            from vmm.virtio.fastpath import DEFAULT_POLL_US
            self.poll_us = int(opts.get("poll_us", DEFAULT_POLL_US))
            if not 0 <= self.poll_us <= 1000:
                raise ValueError
        except ValueError:
            raise DeviceSpecError(f"--drive: poll_us={opts['poll_us']}: microseconds, "
                                  "0 to 1000") from None
        if self.io_engine not in self.IO_ENGINES:
            raise DeviceSpecError(f"--drive: unknown io_engine {self.io_engine!r} "
                                  f"(available: {', '.join(self.IO_ENGINES)})")
        if self.io_engine != "sync" and (self.slow or self.queues > 1):
            raise DeviceSpecError(f"--drive: io_engine={self.io_engine} needs queues=1 and no "
                                  "faults=, trace=, hook= or rate limits")
        self._ioloop = None

    def attach(self, machine, cmdline):
        if self.slow or self.io_engine != "sync":
            self._ioloop = machine.ioloop()   # limiter/delay timers, io_uring completions
        out = super().attach(machine, cmdline)
        fast = getattr(self.transport, "_fast", None)
        if getattr(self, "poll_us", None) is not None and fast is not None:
            fast.set_poll_us(self.poll_us)      # 0: off
        return out

    @classmethod
    def from_fields(cls, path, readonly=False, serial=None, transport="mmio", io_engine="sync",
                    rate_limiter=None):
        """The same spec from separate values (the control API, --config-file):
        no option-string parsing, so a path may contain commas."""
        self = cls.__new__(cls)
        VirtioSpec.__init__(self, {"transport": transport}, "drive")
        self.path, self.readonly, self.serial = path, bool(readonly), serial
        self.io_engine, self._ioloop = io_engine, None
        self.slow = {"limiter": rate_limiter} if rate_limiter is not None else {}
        if serial is not None and len(serial.encode()) > 20:
            raise DeviceSpecError("drive: serial is at most 20 bytes (virtio-blk GET_ID)")
        if not (os.path.isfile(path) or is_block_device(path)):
            raise DeviceSpecError(f"drive: disk image {path}: no such file")
        return self

    def snapshot_options(self):
        """What a restore needs to reopen this disk (vmm/snapshot.py)."""
        from vmm.virtio.intercept_persist import blk_options
        return {"kind": "drive", "file": self.path, "readonly": self.readonly,
                "serial": self.serial, "transport": self.transport_name,
                "queues": getattr(self, "queues", 1), "id": getattr(self, "drive_id", None),
                **({"io_engine": self.io_engine} if self.io_engine != "sync" else {}),
                **blk_options(getattr(self.device, "intercept", None))}  # faults, trace, limits

    def open_device(self):
        from vmm.virtio import BlkDevice
        dev = BlkDevice(self.path, readonly=self.readonly, serial=self.serial,
                        num_queues=self.queues, io_engine=self.io_engine,
                        ioloop=self._ioloop)
        if self.slow:
            dev.ioloop = self._ioloop
            try:
                dev.configure(**_open_writers(self.slow, self.append_traces))
            except BaseException:
                dev.close()
                raise
        return dev


class NetSpec(VirtioSpec):
    """`--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,transport=mmio]`: virtio-net on a tap;
    slow-path options faults=SPEC, pcap=FILE, hook=SOURCE:NAME, rx-bw=, rx-ops=,
    tx-bw=, tx-ops= (as --drive's bw=/ops=)."""
    KEYS = ("tap", "mac", "transport", "queues", "faults", "pcap", "hook",
            "rx-bw", "rx-ops", "tx-bw", "tx-ops")

    def __init__(self, text):
        from vmm.tap import check_name, parse_mac
        opts = parse_options(text, "--net", self.KEYS)
        super().__init__(opts, "--net")
        if "tap" not in opts:
            raise DeviceSpecError("--net: tap=NAME is required")
        try:
            self.tap_name = check_name(opts["tap"])
            self.mac = parse_mac(opts["mac"]) if "mac" in opts else None
        except ValueError as e:
            raise DeviceSpecError(f"--net: {e}") from None
        self.slow = _slow_options(opts, "--net", faults="net",
                                  limiters=(("rx-bw", "rx-ops"), ("tx-bw", "tx-ops")))
        _single_queue(self, "--net")
        self._ioloop = None

    @classmethod
    def from_fields(cls, tap_name, mac=None, transport="mmio", rx_rate_limiter=None,
                    tx_rate_limiter=None):
        """The same spec from separate values (control API, --config-file)."""
        from vmm.tap import check_name, parse_mac
        self = cls.__new__(cls)
        VirtioSpec.__init__(self, {"transport": transport}, "network interface")
        self.slow = {k: v for k, v in (("rx_limiter", rx_rate_limiter),
                                       ("tx_limiter", tx_rate_limiter)) if v is not None}
        try:
            self.tap_name = check_name(tap_name)
            self.mac = parse_mac(mac) if mac is not None else None
        except ValueError as e:
            raise DeviceSpecError(f"network interface: {e}") from None
        self._ioloop = None
        return self

    def attach(self, machine, cmdline):
        self._ioloop = machine.ioloop()     # the tap is polled by the I/O thread
        return super().attach(machine, cmdline)

    def snapshot_options(self):
        from vmm.virtio.intercept_persist import net_options
        dev = self.transport.device
        return {"kind": "net", "tap": self.tap_name, "mac": dev.mac.hex(":"),
                "transport": self.transport_name, "queues": getattr(self, "queues", 1),
                "id": getattr(self, "iface_id", None), **net_options(dev.intercept)}

    def open_device(self):
        from vmm.tap import Tap
        from vmm.virtio.net import NetDevice, NetError
        try:
            tap = Tap(self.tap_name, queues=self.queues)
        except OSError as e:
            raise NetError(e.strerror or str(e)) from None
        try:
            dev = NetDevice(tap, mac=self.mac, ioloop=self._ioloop, queue_pairs=self.queues)
        except BaseException:
            tap.close()
            raise
        if self.slow:
            try:
                dev.configure(**_open_writers(self.slow, self.append_traces))
            except BaseException:
                dev.close()
                raise
        return dev


class VsockSpec(VirtioSpec):
    """`--vsock cid=3,uds=PATH[,transport=mmio|pci]`: virtio-vsock with
    Firecracker's hybrid host side (host programs connect to PATH; guest
    connections to CID 2 port P go to PATH_P)."""
    KEYS = ("cid", "uds", "transport")

    def __init__(self, text):
        opts = parse_options(text, "--vsock", self.KEYS)
        super().__init__(opts, "--vsock")
        if "uds" not in opts or not opts["uds"]:
            raise DeviceSpecError("--vsock: uds=PATH is required")
        try:
            cid = int(opts.get("cid", "3"), 0)
        except ValueError:
            raise DeviceSpecError(f"--vsock: cid must be a number, not {opts['cid']!r}") from None
        self._check(cid, opts["uds"], "--vsock")

    @classmethod
    def from_fields(cls, guest_cid, uds_path, transport="mmio"):
        """The same spec from separate values (control API, --config-file)."""
        self = cls.__new__(cls)
        VirtioSpec.__init__(self, {"transport": transport}, "vsock")
        self._check(guest_cid, uds_path, "vsock")
        return self

    def _check(self, cid, uds_path, what):
        if not 3 <= cid < 0xFFFFFFFF:
            raise DeviceSpecError(f"{what}: cid must be from 3 to 4294967294 (0-2 are reserved)")
        if not uds_path:
            raise DeviceSpecError(f"{what}: the uds path is empty")
        parent = os.path.dirname(os.path.abspath(uds_path))
        if not os.path.isdir(parent):
            raise DeviceSpecError(f"{what}: directory {parent} for uds path {uds_path} "
                                  "does not exist")
        self.cid, self.uds_path = cid, uds_path
        self._ioloop = None

    def attach(self, machine, cmdline):
        self._ioloop = machine.ioloop()     # host sockets are polled by the I/O thread
        return super().attach(machine, cmdline)

    def snapshot_options(self):
        """A restore reopens the same uds path; connections are not carried
        over (the guest gets TRANSPORT_RESET, vmm/virtio/vsock.py)."""
        return {"kind": "vsock", "cid": self.cid, "uds": self.uds_path,
                "transport": self.transport_name}

    def open_device(self):
        from vmm.virtio.vsock import VsockDevice
        return VsockDevice(self.uds_path, guest_cid=self.cid, ioloop=self._ioloop)



class RngSpec(VirtioSpec):
    """`--rng [bw=SIZE:REFILL_MS[:BURST]][,ops=...][,transport=mmio|pci]`:
    virtio-rng fed by getrandom(2), optionally rate limited (ratelimit.py)."""
    KEYS = ("bw", "ops", "transport")

    def __init__(self, text=""):
        from vmm.virtio.ratelimit import RateLimiter, RateLimitError
        opts = parse_options(text or "", "--rng", self.KEYS)
        super().__init__(opts, "--rng")
        try:
            self.rate_limiter = RateLimiter.from_options(opts.get("bw"), opts.get("ops"))
        except RateLimitError as e:
            raise DeviceSpecError(f"--rng: {e}") from None
        self._ioloop = None

    def attach(self, machine, cmdline):
        self._ioloop = machine.ioloop()     # rate-limiter timers run on the I/O thread
        return super().attach(machine, cmdline)

    def snapshot_options(self):
        from vmm.virtio.intercept_persist import limiter_options
        return {"kind": "rng", "transport": self.transport_name,
                **limiter_options(getattr(self.device, "rate_limiter", self.rate_limiter), "bw", "ops")}

    def open_device(self):
        from vmm.virtio.rng import RngDevice
        return RngDevice(rate_limiter=self.rate_limiter, ioloop=self._ioloop)


def _single_queue(spec, what):
    """The slow path (faults, tracing, hooks, limiters) serves one queue (pair)."""
    if spec.slow and spec.queues > 1:
        raise DeviceSpecError(f"{what}: faults=, trace=, pcap=, hook= and rate limits "
                              "need queues=1")


def _slow_options(opts, what, faults, limiters):
    """The intercept.py settings a --drive/--net asks for ({} if none):
    parsed now, so a bad SPEC is a one-line usage error before anything opens."""
    from vmm.virtio.faults import DiskFaults, FaultSpecError, NetFaults
    from vmm.virtio.hooks import HookError, load_hook
    from vmm.virtio.ratelimit import RateLimiter, RateLimitError, TokenBucket
    out = {}
    try:
        if "faults" in opts:
            out["faults"] = (DiskFaults if faults == "disk" else NetFaults)(opts["faults"])
        if "hook" in opts:
            out["hook"] = load_hook(opts["hook"], "hook")
        for bw, ops in limiters:
            lim = RateLimiter(TokenBucket.parse(opts[bw], bw) if bw in opts else None,
                              TokenBucket.parse(opts[ops], ops) if ops in opts else None)
            if lim.active:
                key = "limiter" if bw == "bw" else f"{bw[:2]}_limiter"
                out[key] = lim
    except (FaultSpecError, HookError, RateLimitError) as e:
        raise DeviceSpecError(f"{what}: {e}") from None
    for key in ("trace", "pcap"):
        if key in opts:
            out[key] = opts[key]       # a path: opened by open_device
    return out


def _open_writers(slow, append=False):
    """The settings with trace=/pcap= paths replaced by open writers
    (appending to the files after a restore)."""
    from vmm.virtio.trace import BlkTracer, PcapWriter
    conf = dict(slow)
    if "trace" in conf:
        conf["tracer"] = BlkTracer(conf.pop("trace"), append=append)
    if "pcap" in conf:
        conf["pcap"] = PcapWriter(conf["pcap"], append=append)
    return conf


def spec_from_options(opts, override=None):
    """Rebuild a --drive/--net spec from snapshot_options() for a restore;
    `override` (the text of a --drive/--net given to `pyvmm restore`)
    replaces the backend: file= for a disk, tap= for a NIC; the transport
    and the guest-visible options stay the snapshot's."""
    opts = dict(opts)
    kind = opts.pop("kind", None)
    ident = opts.pop("id", None)          # the API's drive_id / iface_id
    if kind == "drive":
        cls, keep = DriveSpec, {"transport", "queues"}
    elif kind == "net":
        cls, keep = NetSpec, {"transport", "mac", "queues"}
    elif kind == "rng":
        cls, keep = RngSpec, {"transport"}
    elif kind == "vsock":
        cls, keep = VsockSpec, {"transport", "cid"}
    elif kind == "trace-exits":
        from vmm.virtio.trace import ExitTraceSpec
        return ExitTraceSpec(opts["path"], append=True)
    else:
        raise DeviceSpecError(f"snapshot has a device of unknown kind {kind!r}")
    if override is not None:
        what = {"drive": "--drive", "vsock": "--vsock"}.get(kind, "--net")
        given = parse_options(override, what, cls.KEYS)
        for k in keep:
            if k in given and str(given[k]) != str(opts.get(k)):
                raise DeviceSpecError(f"{what}: {k} cannot change on restore "
                                      f"(the snapshot has {opts.get(k)})")
        opts.update(given)
    parts = []
    for k, v in opts.items():
        if v is None or v is False:
            continue
        v = "on" if v is True else str(v)
        if "," in v:
            raise DeviceSpecError(f"snapshot device option {k}={v!r} contains a comma")
        parts.append(f"{k}={v}")
    spec = cls(",".join(parts))
    spec.append_traces = True
    if ident is not None:
        setattr(spec, "drive_id" if kind == "drive" else "iface_id", ident)
    return spec
