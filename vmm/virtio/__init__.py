"""virtio 1.1: device contract, split virtqueues, the virtio-mmio and legacy
virtio-pci transports (shared logic in transport.py), virtio-blk.

Wiring a disk into a VM (see VirtioMmio's docstring):

    loop = IoLoop(); loop.start()
    dev = BlkDevice(path, readonly=False, serial=None)
    t = VirtioMmio(dev, mem, irq=irqfd, register_ioeventfd=cb, ioloop=loop)
    bus.register(base, VirtioMmio.WINDOW, t)
    ...
    loop.stop(); t.close(); loop.close()

On legacy virtio-pci (pci_legacy.py) the same device sits behind a PCI
function: `VirtioPciAttachment(open_device)` wires it into a Machine.
"""
from vmm.virtio.blk import BlkDevice, BlkError
from vmm.virtio.device import VirtioDevice, VirtioError
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.pci_legacy import VirtioPciAttachment, VirtioPciLegacy
from vmm.virtio.queue import QueueError, Virtqueue

__all__ = ["BlkDevice", "BlkError", "IoLoop", "QueueError", "VirtioDevice", "VirtioError",
           "VirtioMmio", "VirtioPciAttachment", "VirtioPciLegacy", "Virtqueue"]
