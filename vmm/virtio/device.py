"""The device contract every virtio device implements (virtio 1.1 §2).

Transports (vmm/virtio/mmio.py, pci_legacy.py; shared logic in transport.py)
decode registers and run the status state machine; a device only sees:

- `device_type` (§5: 2 = block), `features` (offered bits, §2.2 and §6),
  `queue_max_sizes` (one entry per queue),
- `read_config(offset, size)` / `write_config(offset, size, value)` over its
  device-specific configuration space (§2.5, little-endian),
- `activate(mem, queues, interrupt)` once the driver sets DRIVER_OK, with the
  negotiated bits in `acked_features`, the programmed `Virtqueue`s and an
  `Interrupt` to signal the driver,
- `queue_notify(index)` for each driver notification (§2.7.13 / §4.2.3.3),
- `reset()` (§2.1 status write of 0, §2.4), and `close()`.

Snapshots (vmm/snapshot.py) add three methods; a device that has not
implemented `rings()` cannot be snapshotted (the snapshot is refused with
one line, never written half):

- `state()` -> dict of plain JSON values (ints, strings, bools, lists,
  dicts; bytes as hex): everything device-specific the driver could have
  seen or changed, plus the options needed to reopen the backend (image
  path, tap name, MAC), and `acked_features`.  The base class saves
  `acked_features`; a subclass extends the dict.
- `restore(state)` loads it into a freshly constructed device (backend
  already reopened, not yet activated) and refuses a backend that no longer
  matches (e.g. a disk of another size) with its VirtioError.
- `rings()` -> {queue index: ring walker (NativeRing/PyRing)} of an
  activated device.  The transport saves each queue as a QueueState
  (vmm/virtio/queue.py: size, ready, ring addresses, next_avail, next_used,
  EVENT_IDX bookkeeping) and, on restore, re-activates the device with the
  programmed queues and puts its walkers back where they were, so the
  driver continues without a reset.

The transport side (Transport.state()/restore() in transport.py, extended
by each transport for its own registers: mmio's feature selectors, PCI
config space and BAR addresses, modern virtio-pci's common configuration
and MSI-X in pci_persist.py) wraps the device's dict; after a restore
`Transport.restart()` raises any interrupt that was pending and re-checks
every queue (a kick that was in flight when the VM paused is not lost).
Devices must finish their in-flight work before `state()` is called: the
Machine pauses the vCPUs and then stops the I/O thread, so every handler
has returned.

A device raises its own VirtioError subclass; a malformed queue (a guest bug)
is reported with `interrupt.needs_reset(reason)`, never by raising.
"""

# §2.1 device status bits
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# §6 reserved (device-independent) feature bits
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# §4.2.2 InterruptStatus bits
INT_USED = 1
INT_CONFIG = 2


def bit(n):
    return 1 << n


class VirtioError(Exception):
    """Base of every device's error type."""


class Interrupt:
    """What a device may ask of its transport (implemented by transport.Transport)."""

    def used(self, queue_index=0):
        """Used buffer notification (§2.6.7.2)."""
        raise NotImplementedError

    def config(self):
        """Configuration change notification (§2.5.1): bumps ConfigGeneration."""
        raise NotImplementedError

    def needs_reset(self, reason):
        """Set DEVICE_NEEDS_RESET (§2.1.2) and tell the driver."""
        raise NotImplementedError


class VirtioDevice:
    device_type = 0
    queue_max_sizes = ()

    def __init__(self):
        self.features = bit(VIRTIO_F_VERSION_1)
        self.acked_features = 0

    @property
    def num_queues(self):
        return len(self.queue_max_sizes)

    def has(self, feature_bit):
        """Whether `feature_bit` was negotiated."""
        return bool(self.acked_features >> feature_bit & 1)

    def config_bytes(self):
        """The device configuration space, as bytes (§2.5)."""
        return b""

    def read_config(self, offset, size):
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset, size, value):
        """Most fields are read-only; writes are ignored unless overridden."""

    def activate(self, mem, queues, interrupt):
        raise NotImplementedError

    def queue_notify(self, index):
        """The driver kicked queue `index`.  A device that bounds the work
        done per call returns True when work is left: the transport calls
        again later (after other fds on the I/O thread), so no request is
        lost and a stop is never held up for long."""
        raise NotImplementedError

    def reset(self):
        self.acked_features = 0

    # --- snapshots (see the module docstring) ---
    def state(self):
        return {"acked_features": self.acked_features}

    def restore(self, state):
        acked = int(state["acked_features"])
        if acked & ~self.features:
            raise VirtioError(f"{type(self).__name__}: snapshot acked features 0x{acked:x} "
                              f"that this device does not offer (0x{self.features:x})")
        self.acked_features = acked

    def rings(self):
        raise NotImplementedError(f"{type(self).__name__} does not support snapshots")

    def close(self):
        pass
