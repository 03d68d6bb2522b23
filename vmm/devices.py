"""Command-line device specs and how they attach to a Machine.

`--drive file=PATH[,readonly=on][,serial=S][,transport=mmio|pci]` becomes a
DriveSpec, `--net tap=NAME[,mac=M][,transport=mmio|pci]` a NetSpec; attach()
opens the device and wires it on its transport (vmm.devices for mmio,
vmm.virtio.pci_legacy for legacy virtio-pci), returning the kernel command
line with whatever the transport needs announced.
"""
import os
import stat

from vmm.arch.x86 import layout as L

# ISA IRQs free for devices (4 is COM1; 1, 8, 12 and 13 are taken on a PC),
# in the order kvmtool and Firecracker hand them out.
DEVICE_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 3)
TRANSPORTS = ("mmio", "pci")


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
    vmm.virtio.pci_legacy.VirtioPciAttachment)."""

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

    def __init__(self, opts, what):
        self.transport_name = opts.get("transport", "mmio")
        if self.transport_name not in TRANSPORTS:
            raise DeviceSpecError(f"{what}: unknown transport {self.transport_name!r} "
                                  f"(available: {', '.join(TRANSPORTS)})")
        self._attachment = None

    @property
    def transport(self):
        return None if self._attachment is None else self._attachment.transport

    def open_device(self):
        raise NotImplementedError

    def attach(self, machine, cmdline):
        if self.transport_name == "pci":
            from vmm.virtio.pci_legacy import VirtioPciAttachment
            self._attachment = VirtioPciAttachment(self.open_device)
        else:
            self._attachment = VirtioMmioAttachment(self.open_device)
        return self._attachment.attach(machine, cmdline)

    def close(self):
        if self._attachment is not None:
            self._attachment.close()
            self._attachment = None


class DriveSpec(VirtioSpec):
    KEYS = ("file", "readonly", "serial", "transport")

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

    def snapshot_options(self):
        """What a restore needs to reopen this disk (vmm/snapshot.py)."""
        return {"kind": "drive", "file": self.path, "readonly": self.readonly,
                "serial": self.serial, "transport": self.transport_name}

    def open_device(self):
        from vmm.virtio import BlkDevice
        return BlkDevice(self.path, readonly=self.readonly, serial=self.serial)


class NetSpec(VirtioSpec):
    """`--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,transport=mmio]`: virtio-net on a tap."""
    KEYS = ("tap", "mac", "transport")

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
        self._ioloop = None

    def attach(self, machine, cmdline):
        self._ioloop = machine.ioloop()     # the tap is polled by the I/O thread
        return super().attach(machine, cmdline)

    def snapshot_options(self):
        dev = self.transport.device
        return {"kind": "net", "tap": self.tap_name, "mac": dev.mac.hex(":"),
                "transport": self.transport_name}

    def open_device(self):
        from vmm.tap import Tap
        from vmm.virtio.net import NetDevice, NetError
        try:
            tap = Tap(self.tap_name)
        except OSError as e:
            raise NetError(e.strerror or str(e)) from None
        try:
            return NetDevice(tap, mac=self.mac, ioloop=self._ioloop)
        except BaseException:
            tap.close()
            raise


def spec_from_options(opts, override=None):
    """Rebuild a --drive/--net spec from snapshot_options() for a restore;
    `override` (the text of a --drive/--net given to `pyvmm restore`)
    replaces the backend: file= for a disk, tap= for a NIC; the transport
    and the guest-visible options stay the snapshot's."""
    opts = dict(opts)
    kind = opts.pop("kind", None)
    if kind == "drive":
        cls, keep = DriveSpec, {"transport"}
    elif kind == "net":
        cls, keep = NetSpec, {"transport", "mac"}
    else:
        raise DeviceSpecError(f"snapshot has a device of unknown kind {kind!r}")
    if override is not None:
        what = "--drive" if kind == "drive" else "--net"
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
    return cls(",".join(parts))
