"""The virtio-net control virtqueue (virtio 1.1 §5.1.6.5), serviced in
Python: commands are rare (set-up, ip link changes), never per packet.

A command is one chain: device-readable `u8 class, u8 command`, then the
command's data, then one device-writable `u8 ack` (VIRTIO_NET_OK or _ERR).

- VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET (§5.1.6.5.5): le16 pairs, 1..max.
- VIRTIO_NET_CTRL_RX (§5.1.6.5.2, with CTRL_RX): PROMISC, ALLMULTI with a u8
  on/off; the state is recorded and acknowledged.  The device still hands
  the guest every frame the tap gives it (the host side decides what
  reaches the tap), which is what promiscuous mode asks and a superset of
  the rest (§5.1.6.5.1 makes filtering best effort).
- VIRTIO_NET_CTRL_MAC (§5.1.6.5.2): TABLE_SET (two tables of le32 count +
  6-byte entries, recorded), ADDR_SET (with CTRL_MAC_ADDR: the config
  space mac changes).
- Anything else (unknown class/command, a missing feature, malformed data)
  is answered VIRTIO_NET_ERR.  A chain without room for the ack cannot be
  answered: it is returned with length 0.
"""
import logging
import struct

from vmm.virtio.queue import PyRing, QueueError

log = logging.getLogger("pyvmm.virtio.net")

OK, ERR = 0, 1
CLASS_RX, CLASS_MAC, CLASS_MQ = 0, 1, 4
RX_PROMISC, RX_ALLMULTI = 0, 1
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
MQ_VQ_PAIRS_SET = 0
F_CTRL_RX, F_CTRL_MAC_ADDR = 18, 23


class ControlQueue:
    def __init__(self, dev, mem, queue, event_idx=False, indirect=False):
        self.dev, self.index = dev, queue.index
        self.ring = PyRing(mem, queue, event_idx=event_idx, indirect=indirect)
        self.commands = 0

    def process(self):
        """Answer every command the driver queued (device lock held)."""
        done = 0
        try:
            while True:
                chain = self.ring.pop()
                while chain is not None:
                    self.ring.push(chain.head, self._one(chain))
                    done += 1
                    chain = self.ring.pop()
                if not self.ring.enable_notify():
                    break
        except QueueError as e:
            self.ring.fail(e.code)
            self.dev._interrupt.needs_reset(QueueError(e.code, self.index))
            return
        if done and self.ring.need_interrupt():
            self.dev._interrupt.used(self.index)

    def _one(self, chain):
        """Run one command; returns the used length (1 with an ack)."""
        self.commands += 1
        data = b"".join(v.tobytes() for v in chain.readable)
        if not chain.writable or not len(chain.writable[0]):
            log.debug("virtio-net: control command without an ack byte")
            return 0
        ack = ERR
        if len(data) >= 2:
            ack = self._command(data[0], data[1], data[2:])
        chain.writable[0][0] = ack
        return 1

    def _command(self, cls, cmd, data):
        dev = self.dev
        if cls == CLASS_MQ and cmd == MQ_VQ_PAIRS_SET and len(data) == 2:
            return OK if dev.set_queue_pairs(struct.unpack("<H", data)[0]) else ERR
        if cls == CLASS_RX and dev.has(F_CTRL_RX) and cmd in (RX_PROMISC, RX_ALLMULTI) \
                and len(data) == 1:
            dev.rx_mode[cmd] = bool(data[0])
            return OK
        if cls == CLASS_MAC and cmd == MAC_ADDR_SET and dev.has(F_CTRL_MAC_ADDR) and len(data) == 6:
            dev.mac = bytes(data)
            return OK
        if cls == CLASS_MAC and cmd == MAC_TABLE_SET:
            tables = _mac_tables(data)
            if tables is not None:
                dev.mac_tables = tables
                return OK
        log.debug("virtio-net: control class %d command %d (%d bytes) refused", cls, cmd, len(data))
        return ERR


def _mac_tables(data):
    """Two virtio_net_ctrl_mac tables (unicast, multicast), or None."""
    tables, pos = [], 0
    for _ in range(2):
        if pos + 4 > len(data):
            return None
        n = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if n > (len(data) - pos) // 6:
            return None
        tables.append([bytes(data[pos + 6 * i:pos + 6 * i + 6]) for i in range(n)])
        pos += 6 * n
    return tuple(tables) if pos == len(data) else None
