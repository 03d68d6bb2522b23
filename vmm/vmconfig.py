"""One configuration model for a VM, shared by the control API, --config-file
and (for describing a running VM) `pyvmm run`: Firecracker's resources
(boot-source, machine-config, drives, network-interfaces, logger, metrics)
as plain records (vmm/record.py), and the conversion to the MachineConfig that
vmm.machine builds from.

Field names and defaults follow Firecracker's OpenAPI spec (firecracker.yaml,
v1.14.1): mem_size_mib defaults to 128, vcpu_count to 1; a root drive goes
first (so it is /dev/vda) and adds `root=/dev/vda rw|ro` (or
`root=PARTUUID=... rw|ro`) to the kernel command line, as Firecracker does.
"""
from __future__ import annotations

from vmm import guest
from vmm.record import Factory, Record

# Firecracker's CPU templates (all of them mask CPUID bits on top of the host's)
# mapped onto ours; "None" means "no template", which on software KVM cannot boot
# a kernel, so it maps onto "auto" (host CPUID on real hardware, minimal otherwise).
CPU_TEMPLATES = {"None": "auto", "C3": "minimal", "T2": "minimal", "T2S": "minimal",
                 "T2CL": "minimal", "T2A": "minimal", "V1N1": "minimal"}
MAX_VCPUS = 32
IO_ENGINES = {"Sync": "sync", "Async": "io_uring"}   # Firecracker's -> vmm.virtio.blk's


class ConfigError(ValueError):
    """A configuration that cannot be used (one line, for a 400 or the CLI)."""


class BootSource(Record):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None


class MachineCfg(Record):
    vcpu_count: int = 1
    mem_size_mib: int = 128
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: str = "None"
    huge_pages: str = "None"


class Drive(Record):
    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"
    io_engine: str = "Sync"
    rate_limiter: dict | None = None      # Firecracker's RateLimiter (vmm/api/limits.py)


class NetIface(Record):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: dict | None = None
    tx_rate_limiter: dict | None = None


class Vsock(Record):
    guest_cid: int
    uds_path: str
    vsock_id: str | None = None


class Logger(Record):
    log_path: str | None = None
    level: str = "Info"
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None


class VmConfig(Record):
    boot_source: BootSource | None = None
    machine: MachineCfg = Factory(MachineCfg)
    drives: dict[str, Drive] = Factory(dict)      # insertion order kept
    nets: dict[str, NetIface] = Factory(dict)
    logger: Logger | None = None
    metrics_path: str | None = None
    entropy: dict | None = None      # PUT /entropy body: a virtio-rng device
    vsock: Vsock | None = None

    # -- views ---------------------------------------------------------------
    def ordered_drives(self):
        """Root device first (it becomes /dev/vda), then the others in order."""
        ds = list(self.drives.values())
        return [d for d in ds if d.is_root_device] + [d for d in ds if not d.is_root_device]

    def root_args(self):
        root = next((d for d in self.drives.values() if d.is_root_device), None)
        if root is None:
            return ""
        dev = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
        return f"root={dev} {'ro' if root.is_read_only else 'rw'}"

    def cmdline(self):
        b = self.boot_source
        base = b.boot_args if b is not None and b.boot_args is not None else guest.DEFAULT_CMDLINE
        return " ".join(filter(None, [base, self.root_args()]))

    def to_dict(self):
        """Firecracker's FullVmConfiguration: enough to recreate the VM (it is
        also a valid --config-file)."""
        out = {}
        if self.boot_source is not None:
            out["boot-source"] = _strip(vars(self.boot_source))
        out["machine-config"] = dict(vars(self.machine))
        out["drives"] = [_strip(vars(d)) for d in self.drives.values()]
        out["network-interfaces"] = [_strip(vars(n)) for n in self.nets.values()]
        if self.vsock is not None:
            out["vsock"] = _strip(vars(self.vsock))
        if self.logger is not None:
            out["logger"] = _strip(vars(self.logger))
        if self.metrics_path is not None:
            out["metrics"] = {"metrics_path": self.metrics_path}
        if self.entropy is not None:
            out["entropy"] = _strip(self.entropy)
        return out

    # -- building ------------------------------------------------------------
    def to_machine_config(self, serial_out=None, serial_in=None, timeout=None):
        """The MachineConfig vmm.machine builds from; raises ConfigError."""
        from vmm.devices import DeviceSpecError, DriveSpec, NetSpec, RngSpec, VsockSpec
        from vmm.machine import MachineConfig
        from vmm.virtio.ratelimit import RateLimiter, RateLimitError
        import os
        b = self.boot_source
        if b is None:
            raise ConfigError("no boot source: PUT /boot-source with kernel_image_path first")
        for what, path in (("kernel", b.kernel_image_path), ("initrd", b.initrd_path)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{what} {path}: no such file")
        m = self.machine
        try:
            devices = []
            for d in self.ordered_drives():
                spec = DriveSpec.from_fields(d.path_on_host, readonly=d.is_read_only,
                                             serial=d.drive_id.encode()[:20].decode("utf-8", "ignore"),
                                             rate_limiter=RateLimiter.from_dict(d.rate_limiter),
                                             io_engine=IO_ENGINES[d.io_engine])
                spec.drive_id = d.drive_id
                devices.append(spec)
            for n in self.nets.values():
                spec = NetSpec.from_fields(
                    n.host_dev_name, mac=n.guest_mac,
                    rx_rate_limiter=RateLimiter.from_dict(n.rx_rate_limiter),
                    tx_rate_limiter=RateLimiter.from_dict(n.tx_rate_limiter))
                spec.iface_id = n.iface_id
                devices.append(spec)
            if self.vsock is not None:
                devices.append(VsockSpec.from_fields(self.vsock.guest_cid, self.vsock.uds_path))
            if self.entropy is not None:
                spec = RngSpec("")
                spec.rate_limiter = RateLimiter.from_dict(self.entropy.get("rate_limiter"))
                devices.append(spec)
        except (DeviceSpecError, RateLimitError) as e:
            raise ConfigError(str(e)) from None
        return MachineConfig(kernel=b.kernel_image_path, initrd=b.initrd_path,
                             cmdline=self.cmdline(), mem_size=m.mem_size_mib << 20,
                             cpus=m.vcpu_count, cpu_template=CPU_TEMPLATES[m.cpu_template],
                             serial_out=serial_out, serial_in=serial_in, timeout=timeout,
                             devices=devices, track_dirty_pages=m.track_dirty_pages)

    @classmethod
    def from_machine_config(cls, mc):
        """Describe a VM started with `pyvmm run` flags in this model."""
        from vmm.devices import DriveSpec, NetSpec, RngSpec, VsockSpec
        cfg = cls(boot_source=BootSource(mc.kernel, mc.initrd, mc.cmdline),
                  machine=MachineCfg(vcpu_count=mc.cpus, mem_size_mib=mc.mem_size >> 20,
                                     cpu_template="None",
                                     track_dirty_pages=bool(getattr(mc, "track_dirty_pages", False))))
        nd = nn = 0
        for dev in mc.devices:
            if isinstance(dev, DriveSpec):
                dev.drive_id = f"drive{nd}"
                cfg.drives[dev.drive_id] = Drive(dev.drive_id, dev.path, is_read_only=dev.readonly)
                nd += 1
            elif isinstance(dev, NetSpec):
                mac = ":".join(f"{b:02x}" for b in dev.mac) if dev.mac else None
                dev.iface_id = f"net{nn}"
                cfg.nets[dev.iface_id] = NetIface(dev.iface_id, dev.tap_name, mac)
                nn += 1
            elif isinstance(dev, RngSpec):
                lim = dev.rate_limiter
                cfg.entropy = {"rate_limiter": _strip(lim.to_dict()) if lim else None}
            elif isinstance(dev, VsockSpec):
                cfg.vsock = Vsock(dev.cid, dev.uds_path)
        return cfg


def _strip(d):
    return {k: v for k, v in d.items() if v is not None}


def check_machine(m):
    """Semantic checks of machine-config beyond the schema's types."""
    if not 1 <= m.vcpu_count <= MAX_VCPUS:
        raise ConfigError(f"vcpu_count must be between 1 and {MAX_VCPUS}")
    from vmm.arch.x86.mptable import MAX_CPUS
    if m.vcpu_count > MAX_CPUS:
        raise ConfigError(f"vcpu_count {m.vcpu_count}: pyvmm supports at most {MAX_CPUS} vCPUs")
    if m.mem_size_mib < 1:
        raise ConfigError("mem_size_mib must be at least 1")
    if m.smt:
        raise ConfigError("smt=true is not supported by pyvmm (vCPUs are presented as cores)")
    if m.huge_pages != "None":
        raise ConfigError(f"huge_pages {m.huge_pages!r} is not supported by pyvmm (only \"None\")")
    if m.cpu_template not in CPU_TEMPLATES:
        raise ConfigError(f"unknown cpu_template {m.cpu_template!r}")
