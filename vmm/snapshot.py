"""Snapshots of a paused VM: the state file format, what is saved and in which
order, and rebuilding a Machine from a snapshot in a fresh process.

State file: a 56-byte header, then the state as UTF-8 JSON:

    magic "PYVMMSNP" | u32 version | u32 flags (0) | u64 payload length |
    32-byte SHA-256 of the payload

A wrong magic, version, length (truncated file) or checksum is refused with
one line before anything is parsed; so are another architecture and a
memory file whose size is not the guest's.  Bytes inside the state (KVM
structs) are base64 strings tagged {"$b64": ...}.

Memory file: guest RAM as one flat file, offset = host offset of the RAM
(the same layout GuestMemory uses, the MMIO hole left out).  A full snapshot
writes every page that is not all zeros (the file is sparse, its size the
guest's RAM); a diff snapshot writes only the pages dirtied since the last
snapshot (KVM's dirty log for guest writes, plus the pages devices wrote),
into a sparse file of the same size, and the state lists those ranges.
Files are written beside their destination and renamed into place, so a VM
restored from (and mapping) an older file is never affected.

Restore maps the memory file MAP_PRIVATE (GuestMemory(backing=...)): pages
load on first touch, so restore time does not grow with RAM, and several VMs
can run from one snapshot at once.  A diff is copied over its base's
mapping (only its ranges).  Layers: a Diff taken on a VM restored from
another Diff needs base + diff1 as its base; rebase() (`pyvmm
snapshot-rebase`) merges a diff into its base file, in order.
"""
import binascii
import hashlib
import json
import logging
import os
import platform
import re
import struct
import time

log = logging.getLogger("pyvmm.snapshot")

MAGIC = b"PYVMMSNP"
VERSION = 2                   # 2: i8042 state of the API's keyboard controller
HEADER = struct.Struct("<8sIIQ32s")
PAGE = 4096
ARCH = platform.machine()
MAX_STATE = 64 << 20          # a state file is kilobytes; refuse absurd lengths


class SnapshotError(Exception):
    """Any snapshot problem, as one line for the user."""


# --- state file ----------------------------------------------------------
def _encode(obj):
    if isinstance(obj, (bytes, bytearray)):
        return {"$b64": binascii.b2a_base64(bytes(obj), newline=False).decode("ascii")}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if set(obj) == {"$b64"}:
            return binascii.a2b_base64(obj["$b64"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def pack_state(state):
    payload = json.dumps(_encode(state), separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def unpack_state(data, what="state file"):
    """Validate and decode; every failure is a one-line SnapshotError."""
    if len(data) < HEADER.size:
        raise SnapshotError(f"{what}: truncated ({len(data)} bytes, not even a header)")
    magic, version, _flags, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{what}: not a pyvmm snapshot state file")
    if version != VERSION:
        raise SnapshotError(f"{what}: snapshot format version {version}, this pyvmm reads {VERSION}")
    payload = data[HEADER.size:]
    if length > MAX_STATE or len(payload) != length:
        raise SnapshotError(f"{what}: truncated or padded ({len(payload)} bytes of state, "
                            f"header says {length})")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{what}: checksum mismatch (the file is corrupted)")
    try:
        state = _decode(json.loads(payload))
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise SnapshotError(f"{what}: unreadable state ({e})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: unreadable state")
    if state.get("arch") != ARCH:
        raise SnapshotError(f"{what}: snapshot of an {state.get('arch')} VM, this host is {ARCH}")
    return state


def _atomic_write(path, write):
    """Write through write(fd) to a temporary file beside `path`, then
    rename it into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_state(path, state):
    data = pack_state(state)

    def write(fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    try:
        _atomic_write(path, write)
    except OSError as e:
        raise SnapshotError(f"cannot write state file {path}: {e.strerror}") from None


def read_state(path):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE + HEADER.size + 1)
    except OSError as e:
        raise SnapshotError(f"cannot read state file {path}: {e.strerror}") from None
    return unpack_state(data, f"state file {path}")


# --- memory file ---------------------------------------------------------
def page_runs(mask):
    """[(first page, page count), ...] of the non-zero runs in a per-page
    mask (bytes/bytearray of 0 and 1, or a numpy bool array)."""
    if hasattr(mask, "astype"):
        mask = mask.astype("uint8").tobytes()
    return [(m.start(), m.end() - m.start()) for m in _SET_RUN.finditer(bytes(mask))]


_SET_RUN = re.compile(rb"[^\x00]+")


def write_memory(mem, path, mask):
    """Write the pages of `mem` selected by `mask` (bool per page) into a
    sparse file of mem.size bytes; returns the runs written."""
    runs = page_runs(mask)
    mv = mem._mv

    def write(fd):
        os.ftruncate(fd, mem.size)
        for first, count in runs:
            off, end = first * PAGE, (first + count) * PAGE
            while off < end:
                off += os.pwrite(fd, mv[off:min(end, off + (64 << 20))], off)
    try:
        _atomic_write(path, write)
    except OSError as e:
        raise SnapshotError(f"cannot write memory file {path}: {e.strerror}") from None
    return runs


def apply_diff(mem, path, runs):
    """Copy the pages listed in `runs` from diff memory file `path` over
    `mem` (a private mapping of the base file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open diff memory file {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != mem.size:
            raise SnapshotError(f"diff memory file {path}: {os.fstat(fd).st_size} bytes, the "
                                f"snapshot's guest has {mem.size}")
        mv = mem._mv
        for first, count in runs:
            off, end = first * PAGE, (first + count) * PAGE
            if end > mem.size:
                raise SnapshotError(f"diff memory file {path}: range beyond guest memory")
            while off < end:
                n = os.preadv(fd, [mv[off:end]], off)
                if n <= 0:
                    raise SnapshotError(f"diff memory file {path}: short read at {off}")
                off += n
    finally:
        os.close(fd)


def rebase(base_path, diff_state_path, diff_mem_path, out_path=None):
    """Layer a Diff snapshot onto the memory file it was taken over
    (Firecracker's rebase-snap / snapshot-editor model): write `out_path`
    (default: replace `base_path`) = the base's pages with the diff's runs
    (from its state file) copied over.  The result is the memory file to
    give as --mem with the diff's own state and memory file, or with the
    next Diff snapshot taken on top of it: base + diff1 + diff2 ... is
    rebase(base, diff1), then rebase(that, diff2), in order.  Written
    beside and renamed into place, so a VM still mapping the old base is
    not affected.  Returns the number of diff pages applied."""
    import numpy as np
    st = read_state(diff_state_path)
    mem = st.get("memory") or {}
    if mem.get("type") != "Diff":
        raise SnapshotError(f"state file {diff_state_path}: not a Diff snapshot")
    try:
        size = int(st["mem_size"])
        runs = [(int(a), int(n)) for a, n in mem["runs"]]
    except (KeyError, TypeError, ValueError):
        raise SnapshotError(f"state file {diff_state_path}: incomplete state") from None
    fds = []
    try:
        for path, what in ((base_path, "base memory file"), (diff_mem_path, "diff memory file")):
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                raise SnapshotError(f"cannot open {what} {path}: {e.strerror}") from None
            if os.fstat(fds[-1]).st_size != size:
                raise SnapshotError(f"{what} {path}: {os.fstat(fds[-1]).st_size} bytes, the "
                                    f"snapshot's guest has {size}")
        if any(a < 0 or n < 0 or (a + n) * PAGE > size for a, n in runs):
            raise SnapshotError(f"state file {diff_state_path}: range beyond guest memory")
        base, diff = fds

        def write(fd):
            os.ftruncate(fd, size)              # holes read as zeros: skip zero chunks
            chunk, zero = 1 << 20, bytes(1 << 20)
            for off in range(0, size, chunk):
                data = os.pread(base, chunk, off)
                if data == zero[:len(data)]:
                    continue
                used = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE).any(axis=1)
                for first, count in page_runs(used):     # keep the file as sparse as the base
                    _pwrite_all(fd, data[first * PAGE:(first + count) * PAGE], off + first * PAGE)
            for first, count in runs:
                off, end = first * PAGE, (first + count) * PAGE
                while off < end:
                    data = os.pread(diff, min(end - off, chunk), off)
                    if not data:
                        raise SnapshotError(f"diff memory file {diff_mem_path}: short read")
                    _pwrite_all(fd, data, off)
                    off += len(data)
        try:
            _atomic_write(out_path or base_path, write)
        except OSError as e:
            raise SnapshotError(f"cannot write memory file {out_path or base_path}: "
                                f"{e.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)
    return sum(n for _, n in runs)


def _pwrite_all(fd, data, off):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


# --- taking a snapshot ---------------------------------------------------
def _device_entries(machine):
    out = []
    for spec in machine._attached:
        opts = getattr(spec, "snapshot_options", None)
        if opts is None:
            raise SnapshotError(f"device {type(spec).__name__} does not support snapshots")
        transport = getattr(spec, "transport", None)     # None: no guest-visible state
        try:
            out.append({"options": opts(),
                        "transport": transport.state() if transport is not None else None})
        except NotImplementedError as e:
            raise SnapshotError(str(e)) from None
    return out


def create(machine, state_path, mem_path, snapshot_type="Full"):
    """Snapshot a paused machine: state file and memory file.  Returns a
    dict of figures (seconds, bytes, pages)."""
    from vmm.kvm import state as kvm_state
    if snapshot_type not in ("Full", "Diff"):
        raise SnapshotError(f"snapshot_type must be Full or Diff, not {snapshot_type!r}")
    if not machine.paused:
        raise SnapshotError("the VM is running: pause it before taking a snapshot")
    if snapshot_type == "Diff" and not machine.vm.log_dirty:
        raise SnapshotError("a Diff snapshot needs the VM started with dirty page tracking "
                            "(track_dirty_pages / enable_diff_snapshots)")
    mem = machine.memory
    if mem.backing is not None and isinstance(mem.backing, str) and os.path.exists(mem_path) \
            and os.path.samefile(mem.backing, mem_path):
        log.debug("replacing the memory file this VM maps (rename keeps the old inode)")
    t0 = time.monotonic()
    for vcpu in machine.vcpus:
        _complete_pending_exit(vcpu)
    msrs = kvm_state.msr_index_list(machine.kvm)
    # Devices first: finishing work still in flight (io_uring) may raise
    # interrupts, which must be in the irqchip and LAPIC state saved next.
    devices = _device_entries(machine)
    state = {
        "arch": ARCH, "created": time.time(), "pyvmm_version": 1,
        "mem_size": mem.size, "cpus": len(machine.vcpus), "cmdline": machine.cmdline,
        "vm": kvm_state.save_vm(machine.vm),
        "vcpus": [kvm_state.save_vcpu(v, msrs) for v in machine.vcpus],
        "legacy": {"serial": machine.serial.state(), "i8042": machine.i8042.state(),
                   "pvpanic": machine.pvpanic.state()},
        "pci_bus": ({"address": machine.pci_bus.address}
                    if getattr(machine, "pci_bus", None) is not None else None),
        "devices": devices,
        "track_dirty_pages": machine.vm.log_dirty,
    }
    t_state = time.monotonic()
    dirty = _dirty_mask(machine) if machine.vm.log_dirty else None
    if snapshot_type == "Full":
        mask = mem.pages_in_use()
    else:
        mask = dirty
    runs = write_memory(mem, mem_path, mask)
    state["memory"] = {"type": snapshot_type, "runs": runs if snapshot_type == "Diff" else None}
    write_state(state_path, state)
    t_end = time.monotonic()
    pages = sum(n for _, n in runs)
    return {"seconds": t_end - t0, "state_seconds": t_state - t0, "pages": pages,
            "mem_bytes": pages * PAGE, "state_bytes": os.path.getsize(state_path)}


def _complete_pending_exit(vcpu):
    """A vCPU parked right after an I/O or MMIO exit has not taken the
    result in yet: the access completes on the next KVM_RUN (KVM API doc,
    kvm_run.immediate_exit).  KVM_RUN with immediate_exit set completes it
    and returns EINTR without running guest code."""
    vcpu.run_struct.immediate_exit = 1
    try:
        vcpu.run()
    finally:
        vcpu.run_struct.immediate_exit = 0


def _dirty_mask(machine):
    """Pages written since the last snapshot (or since start): KVM's dirty
    log (guest writes; reading it clears it) or'ed with the pages devices
    wrote (GuestMemory.device_dirty, cleared too)."""
    import numpy as np
    mem = machine.memory
    mask = np.zeros(mem.size // PAGE, dtype=bool)
    for off, bitmap in machine.vm.dirty_log():
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
        first = off // PAGE
        n = min(len(bits), len(mask) - first)
        mask[first:first + n] |= bits[:n].astype(bool)
    mask |= mem.take_device_dirty()
    return mask


# --- restoring -----------------------------------------------------------
def load(state_path, mem_path, mem_diff=None):
    """Read and check a snapshot before anything is built: returns a
    Restore to put in MachineConfig.restore."""
    state = read_state(state_path)
    try:
        size = int(state["mem_size"])
        state["vcpus"], state["vm"], state["devices"], state["legacy"]  # noqa: B018 - presence
    except (KeyError, TypeError, ValueError):
        raise SnapshotError(f"state file {state_path}: incomplete state") from None
    try:
        have = os.path.getsize(mem_path)
    except OSError as e:
        raise SnapshotError(f"memory file {mem_path}: {e.strerror}") from None
    if have != size:
        raise SnapshotError(f"memory file {mem_path}: {have} bytes, the snapshot's guest has "
                            f"{size} (wrong memory file?)")
    kind = (state.get("memory") or {}).get("type")
    if kind == "Diff" and mem_diff is None:
        raise SnapshotError("this is a Diff snapshot: give its base (full) memory file as "
                            "--mem and its own memory file as --mem-diff")
    if kind != "Diff" and mem_diff is not None:
        raise SnapshotError("--mem-diff given but this is a Full snapshot")
    return Restore(state, mem_path, mem_diff)


class Restore:
    """A checked snapshot, ready to rebuild a Machine from."""

    def __init__(self, state, mem_path, mem_diff=None):
        self.state, self.mem_path, self.mem_diff = state, mem_path, mem_diff

    def device_options(self):
        return [d["options"] for d in self.state["devices"]]


def build(machine, restore):
    """Machine._build for a restore: memory from the file, platform, legacy
    devices, virtio devices re-attached in their order (same windows, IRQs
    and PCI slots), then VM state, vCPU state and device state.  A state
    that lacks something (written by another pyvmm) is one SnapshotError."""
    try:
        _build(machine, restore)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise SnapshotError(f"snapshot state is incomplete or from another pyvmm version "
                            f"({type(e).__name__}: {e})") from None


def _build(machine, restore):
    from vmm.kvm import state as kvm_state
    from vmm.kvm.system import Kvm
    from vmm.kvm.vcpu import Vcpu
    from vmm.kvm.vm import Vm
    from vmm.memory import GuestMemory
    st = restore.state
    c = machine.config
    machine.memory = GuestMemory(int(st["mem_size"]), backing=restore.mem_path)
    if restore.mem_diff is not None:
        apply_diff(machine.memory, restore.mem_diff, st["memory"]["runs"])
    machine.kvm = Kvm()
    machine.vm = Vm(machine.kvm)
    machine.vm.setup_platform()
    machine.vm.add_memory(machine.memory, log_dirty=c.track_dirty_pages)
    if c.track_dirty_pages:
        machine.memory.track_device_writes(True)
    machine._add_legacy_devices()
    if len(c.devices) != len(st["devices"]):
        raise SnapshotError(f"the snapshot has {len(st['devices'])} devices, "
                            f"{len(c.devices)} were given")
    for dev in c.devices:
        machine._attached.append(dev)
        machine._attaching = dev        # its own I/O thread, as Machine._build does
        try:
            dev.attach(machine, "")
        finally:
            machine._attaching = None
    machine.cmdline = st.get("cmdline", "")
    if st.get("pci_bus") is not None:
        bus = getattr(machine, "pci_bus", None)
        if bus is None:
            raise SnapshotError("snapshot has a PCI bus but no PCI device was attached")
        bus.address = int(st["pci_bus"]["address"])
    kvm_state.restore_vm(machine.vm, st["vm"])
    for i, vst in enumerate(st["vcpus"]):
        vcpu = Vcpu(machine.vm, i)
        machine.vcpus.append(vcpu)
        kvm_state.restore_vcpu(vcpu, vst)
    machine.serial.restore(st["legacy"]["serial"])
    machine.i8042.restore(st["legacy"]["i8042"])
    machine.pvpanic.restore(st["legacy"]["pvpanic"])
    for dev, dst in zip(c.devices, st["devices"]):
        if dst["transport"] is not None:
            dev.transport.restore(dst["transport"])
    for dev, dst in zip(c.devices, st["devices"]):
        if dst["transport"] is not None:
            dev.transport.restart()


__all__ = ["Restore", "SnapshotError", "build", "create", "load", "pack_state", "read_state",
           "rebase", "unpack_state", "write_state"]
