"""Snapshot state of the modern and transitional virtio-pci transport
(vmm/virtio/pci_modern.py), kept beside it as Firecracker keeps a device's
persist.rs beside the device.

Transport.state() (transport.py) already has what every transport shares:
device status, ISR bits, driver features, queue_select, config generation
and each queue (size, enable, ring addresses, ring progress).  Here is what
the modern transport adds (virtio 1.1 §4.1.4.3 common configuration):

- device_feature_select, driver_feature_select, config_msix_vector and
  every queue_msix_vector;
- `legacy`: whether a transitional function's driver uses the legacy
  header (§4.1.4.8) or the modern registers (feature/status rules differ);
- the function's configuration space (command, BAR addresses, MSI-X
  Message Control with Enable and Function Mask, the PCI-config-access
  capability's bar/offset/length) and the INTx level;
- MSI-X table entries and pending bits (vmm/pci/msix.py Msix.state()).

Restore: the config space goes back first, so the bus decodes the BARs
where the guest put them and the notify ioeventfds follow (bar_moved); then
the MSI-X table, whose live vectors get their routes in this VM (KVM's GSI
routing and the irqfds are per process; the guest only knows address/data).
Interrupts the guest had not taken yet: a vector's pending bit stays in the
PBA and is sent when the driver unmasks it; a message already sent is in
the LAPIC's IRR (saved with the vCPU); with MSI-X off, the INTx level is
driven again from the ISR bits (Transport.restart()).
"""
from vmm.virtio import device as vd


def save(t):
    return {
        "device_feature_select": t.device_feature_select,
        "driver_feature_select": t.driver_feature_select,
        "config_vector": t.config_vector, "queue_vectors": list(t.queue_vectors),
        "legacy": bool(t.legacy), "transitional": bool(t.transitional),
        "pci_config": bytes(t.pci.config).hex(), "intx": t.pci._intx,
        "msix": t.msix.state(),
    }


def restore(t, st):
    if bool(st["transitional"]) != bool(t.transitional):
        raise vd.VirtioError("virtio-pci: the snapshot's function is "
                             f"{'' if st['transitional'] else 'not '}transitional")
    config = bytes.fromhex(st["pci_config"])
    if len(config) != len(t.pci.config) or config[:4] != bytes(t.pci.config[:4]):
        raise vd.VirtioError("virtio-pci: snapshot config space is for another function")
    vectors = [int(v) for v in st["queue_vectors"]]
    if len(vectors) != len(t.queues):
        raise vd.VirtioError(f"virtio-pci: snapshot has {len(vectors)} queue vectors, "
                             f"the device {len(t.queues)} queues")
    t.device_feature_select = int(st["device_feature_select"]) & 0xFFFFFFFF
    t.driver_feature_select = int(st["driver_feature_select"]) & 0xFFFFFFFF
    t.config_vector = t._vector(int(st["config_vector"]) & 0xFFFF)
    t.queue_vectors = [t._vector(v & 0xFFFF) for v in vectors]
    t.legacy = bool(st["legacy"])
    t.pci.config[:] = config
    t.pci._update_mappings()            # BARs where the guest put them (ioeventfds follow)
    try:
        t.msix.restore(st["msix"])
    except ValueError as e:
        raise vd.VirtioError(f"virtio-pci: {e}") from None
    t.pci._line = 0
    # a function using MSI-X does not drive INTx (PCI 3.0 §6.8.2)
    t.pci.set_intx(0 if t.msix.enabled else int(st.get("intx", 0)))


def restart_irq(t):
    """Transport.restart()'s interrupt half for this transport: INTx from
    the ISR bits only while MSI-X is off (with it on, pending vectors are
    in the PBA, delivered on unmask)."""
    with t._isr_lock:
        if t.interrupt_status and not t.msix.enabled:
            t._raise_irq()


__all__ = ["restart_irq", "restore", "save"]
