"""virtio 1.1: device contract, split virtqueues, the virtio-mmio and legacy
virtio-pci transports (shared logic in transport.py), virtio-blk.

Wiring a disk into a VM (see VirtioMmio's docstring):

    loop = IoLoop(); loop.start()
    dev = BlkDevice(path, readonly=False, serial=None)
    t = VirtioMmio(dev, mem, irq=irqfd, register_ioeventfd=cb, ioloop=loop)
    bus.register(base, VirtioMmio.WINDOW, t)
    ...
    loop.stop(); t.close(); loop.close()

On virtio-pci (pci_legacy.py, pci_modern.py) the same device sits behind a PCI
function: `VirtioPciAttachment(open_device)` wires it into a Machine.
"""
# The names below load on first use (PEP 562): importing one submodule (the
# rate limiter for the API, say) must not pull in every device and transport,
# whose imports are most of a VMM's start-up time.
_LAZY = {"BlkDevice": "blk", "BlkError": "blk", "VirtioDevice": "device",
         "VirtioError": "device", "IoLoop": "ioloop", "VirtioMmio": "mmio",
         "VirtioPciAttachment": "pci_attach", "VirtioPciLegacy": "pci_legacy",
         "QueueError": "queue", "Virtqueue": "queue"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    sub = _LAZY.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
