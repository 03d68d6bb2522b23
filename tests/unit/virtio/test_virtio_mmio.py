"""The virtio-mmio register table (virtio 1.1 §4.2.2) and the status state
machine (§2.1, §3.1.1), with a recording fake device and with virtio-blk."""
import pytest

from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mockdriver import BlkDriver, DriverQueue, T_IN, T_OUT

from virtio_rig import Rig

V1 = 1 << vd.VIRTIO_F_VERSION_1


class Fake(vd.VirtioDevice):
    device_type = 42
    queue_max_sizes = (256, 64)

    def __init__(self):
        super().__init__()
        self.features = V1 | (1 << 3) | (1 << 35)
        self.calls = []
        self.fail_notify = False

    def config_bytes(self):
        return bytes(range(16))

    def activate(self, mem, queues, interrupt):
        self.calls.append(("activate", [(q.size, q.desc, q.driver, q.device, q.ready) for q in queues]))
        self.interrupt = interrupt

    def queue_notify(self, index):
        self.calls.append(("notify", index))
        if self.fail_notify:
            raise RuntimeError("device bug")

    def reset(self):
        super().reset()
        self.calls.append(("reset",))


@pytest.fixture
def fake(mem):
    dev = Fake()
    return dev, VirtioMmio(dev, mem)


def rd(t, off):
    return t.read(off, 4)


def negotiate(t, features=V1, status=vd.ACKNOWLEDGE | vd.DRIVER):
    t.write(m.STATUS, 4, vd.ACKNOWLEDGE)
    t.write(m.STATUS, 4, status)
    for sel in (0, 1):
        t.write(m.DRIVER_FEATURES_SEL, 4, sel)
        t.write(m.DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    t.write(m.STATUS, 4, status | vd.FEATURES_OK)
    return rd(t, m.STATUS)


def test_identification(fake, rig):
    _, t = fake
    assert rd(t, m.MAGIC_VALUE) == 0x74726976
    assert t.read(0, 4).to_bytes(4, "little") == b"virt"
    assert rd(t, m.VERSION) == 2
    assert rd(t, m.DEVICE_ID) == 42
    assert rd(t, m.VENDOR) == m.VENDOR_ID
    assert rd(rig().t, m.DEVICE_ID) == 2                # virtio-blk
    assert VirtioMmio.cmdline(0xD0000000, 5) == "virtio_mmio.device=512@0xd0000000:5"


def test_device_feature_windows(fake):
    _, t = fake
    got = []
    for sel in (0, 1, 2, 7):
        t.write(m.DEVICE_FEATURES_SEL, 4, sel)
        got.append(rd(t, m.DEVICE_FEATURES))
    assert got == [1 << 3, 1 | (1 << 3), 0, 0]


def test_feature_negotiation(fake):
    dev, t = fake
    assert negotiate(t, V1 | (1 << 35)) & vd.FEATURES_OK
    assert dev.acked_features == V1 | (1 << 35)
    t.write(m.DRIVER_FEATURES_SEL, 4, 0)
    t.write(m.DRIVER_FEATURES, 4, 1 << 3)               # after FEATURES_OK: ignored
    assert t.driver_features == V1 | (1 << 35)


@pytest.mark.parametrize("features,status", [
    (V1 | (1 << 4), vd.ACKNOWLEDGE | vd.DRIVER),         # not offered
    (1 << 3, vd.ACKNOWLEDGE | vd.DRIVER),                # no VERSION_1
    (V1, vd.ACKNOWLEDGE),                                # no DRIVER
])
def test_features_ok_refused(fake, features, status):
    dev, t = fake
    assert not negotiate(t, features, status) & vd.FEATURES_OK
    assert dev.acked_features == 0
    t.write(m.STATUS, 4, rd(t, m.STATUS) | vd.DRIVER_OK)
    assert not rd(t, m.STATUS) & vd.DRIVER_OK and not t.activated


def test_queue_registers(fake):
    dev, t = fake
    sizes = []
    for sel in (0, 1, 2):
        t.write(m.QUEUE_SEL, 4, sel)
        sizes.append(rd(t, m.QUEUE_NUM_MAX))
    assert sizes == [256, 64, 0]
    t.write(m.QUEUE_SEL, 4, 1)
    t.write(m.QUEUE_NUM, 4, 32)
    for reg, v in ((m.QUEUE_DESC_LOW, 0x1000), (m.QUEUE_DESC_HIGH, 0x2),
                   (m.QUEUE_DRIVER_LOW, 0x3000), (m.QUEUE_DRIVER_HIGH, 0x4),
                   (m.QUEUE_DEVICE_LOW, 0x5000), (m.QUEUE_DEVICE_HIGH, 0x6)):
        t.write(reg, 4, v)
    assert rd(t, m.QUEUE_READY) == 0
    t.write(m.QUEUE_READY, 4, 1)
    assert rd(t, m.QUEUE_READY) == 1
    t.write(m.QUEUE_DESC_LOW, 4, 0x9000)                # ignored while ready
    q = t.queues[1]
    assert (q.size, q.desc, q.driver, q.device) == (32, 0x2_00001000, 0x4_00003000, 0x6_00005000)
    t.write(m.QUEUE_SEL, 4, 0)
    assert rd(t, m.QUEUE_READY) == 0                    # per-queue
    t.write(m.QUEUE_SEL, 4, 9)
    t.write(m.QUEUE_NUM, 4, 4)                          # no such queue: ignored
    assert rd(t, m.QUEUE_READY) == 0


def test_status_machine_and_activation(fake):
    dev, t = fake
    negotiate(t)
    t.write(m.QUEUE_SEL, 4, 0)
    t.write(m.QUEUE_NUM, 4, 128)
    t.write(m.QUEUE_READY, 4, 1)
    t.write(m.QUEUE_NOTIFY, 4, 0)                       # before DRIVER_OK: ignored
    assert ("notify", 0) not in dev.calls
    t.write(m.STATUS, 4, vd.ACKNOWLEDGE)                # clearing bits: ignored
    assert rd(t, m.STATUS) == vd.ACKNOWLEDGE | vd.DRIVER | vd.FEATURES_OK
    t.write(m.STATUS, 4, vd.ACKNOWLEDGE | vd.DRIVER | vd.FEATURES_OK | vd.DRIVER_OK)
    assert t.activated and dev.calls[-1] == ("activate", [(128, 0, 0, 0, True), (64, 0, 0, 0, False)])
    t.write(m.QUEUE_SEL, 4, 1)
    t.write(m.QUEUE_NUM, 4, 8)                          # after DRIVER_OK: ignored
    assert t.queues[1].size == 64
    t.write(m.QUEUE_NOTIFY, 4, 1)
    t.write(m.QUEUE_NOTIFY, 4, 5)                       # no such queue
    assert dev.calls[-1] == ("notify", 1)
    t.write(m.STATUS, 4, rd(t, m.STATUS) | vd.FAILED)
    assert rd(t, m.STATUS) & vd.FAILED


def test_driver_ok_needs_features_ok(fake):
    dev, t = fake
    t.write(m.STATUS, 4, vd.ACKNOWLEDGE | vd.DRIVER | vd.DRIVER_OK)
    assert rd(t, m.STATUS) == vd.ACKNOWLEDGE | vd.DRIVER and not t.activated


def test_reset_clears_state(fake):
    dev, t = fake
    negotiate(t, V1 | (1 << 35))
    t.write(m.QUEUE_SEL, 4, 1)
    t.write(m.QUEUE_NUM, 4, 16)
    t.write(m.QUEUE_DESC_LOW, 4, 0x1000)
    t.write(m.QUEUE_READY, 4, 1)
    t.write(m.STATUS, 4, rd(t, m.STATUS) | vd.DRIVER_OK)
    dev.interrupt.used()
    t.write(m.DEVICE_FEATURES_SEL, 4, 1)
    assert rd(t, m.INTERRUPT_STATUS) == vd.INT_USED
    t.write(m.STATUS, 4, 0)
    assert dev.calls[-1] == ("reset",) and dev.acked_features == 0
    assert rd(t, m.STATUS) == 0 and rd(t, m.INTERRUPT_STATUS) == 0 and not t.activated
    assert (t.driver_features, t.device_features_sel, t.queue_sel) == (0, 0, 0)
    q = t.queues[1]
    assert (q.size, q.desc, q.ready) == (64, 0, False)
    t.write(m.QUEUE_NOTIFY, 4, 1)
    assert dev.calls[-1] == ("reset",)


def test_interrupt_status_and_ack(fake):
    dev, t = fake
    fired = []
    t._irq = lambda: fired.append(1)
    negotiate(t)
    t.write(m.STATUS, 4, rd(t, m.STATUS) | vd.DRIVER_OK)
    dev.interrupt.used()
    dev.interrupt.config()
    assert rd(t, m.INTERRUPT_STATUS) == vd.INT_USED | vd.INT_CONFIG and len(fired) == 2
    t.write(m.INTERRUPT_ACK, 4, vd.INT_USED)
    assert rd(t, m.INTERRUPT_STATUS) == vd.INT_CONFIG
    t.write(m.INTERRUPT_ACK, 4, vd.INT_CONFIG)
    assert rd(t, m.INTERRUPT_STATUS) == 0


def test_config_generation_and_space(fake):
    dev, t = fake
    g = rd(t, m.CONFIG_GENERATION)
    assert rd(t, m.CONFIG_GENERATION) == g              # stable while nothing changes
    dev.interrupt = t
    t.config()
    assert rd(t, m.CONFIG_GENERATION) == g + 1
    assert rd(t, m.INTERRUPT_STATUS) & vd.INT_CONFIG
    assert t.read(m.CONFIG + 4, 4) == 0x07060504
    assert t.read(m.CONFIG + 5, 1) == 5 and t.read(m.CONFIG + 6, 2) == 0x0706
    assert t.read(m.CONFIG + 0x40, 4) == 0


def test_narrow_or_misaligned_register_access_ignored(fake):
    _, t = fake
    assert t.read(m.MAGIC_VALUE, 2) == 0 and t.read(m.MAGIC_VALUE + 1, 4) == 0
    t.write(m.STATUS, 1, vd.ACKNOWLEDGE)
    t.write(m.STATUS + 2, 4, vd.ACKNOWLEDGE)
    assert rd(t, m.STATUS) == 0


def test_device_exception_sets_needs_reset(fake):
    dev, t = fake
    negotiate(t)
    t.write(m.STATUS, 4, rd(t, m.STATUS) | vd.DRIVER_OK)
    dev.fail_notify = True
    t.write(m.QUEUE_NOTIFY, 4, 0)                       # must not raise
    assert rd(t, m.STATUS) & vd.DEVICE_NEEDS_RESET
    assert rd(t, m.INTERRUPT_STATUS) & vd.INT_CONFIG
    n = len(dev.calls)
    t.write(m.QUEUE_NOTIFY, 4, 0)                       # stopped until reset
    assert len(dev.calls) == n
    t.write(m.STATUS, 4, 0)
    assert rd(t, m.STATUS) == 0


def test_legacy_interface(mem, image, native):
    """§4.2.4 version 1: GuestPageSize, QueueAlign, QueuePFN; no FEATURES_OK."""
    r = Rig(mem, image, native)
    t = VirtioMmio(r.dev, mem, legacy=True)
    d = BlkDriver(t, mem, arena=0x400000)
    assert rd(t, m.VERSION) == 1
    assert not d.device_features() & V1
    t.write(m.STATUS, 4, 0)
    d.set_status(vd.ACKNOWLEDGE | vd.DRIVER)
    d.features = d.device_features() & ~(1 << vd.VIRTIO_F_RING_EVENT_IDX)
    d.wr(m.DRIVER_FEATURES_SEL, 0)
    d.wr(m.DRIVER_FEATURES, d.features & 0xFFFFFFFF)
    d.wr(m.GUEST_PAGE_SIZE, 4096)
    d.wr(m.QUEUE_SEL, 0)
    size = 16
    q = DriverQueue(d, 0, size)
    base = d.alloc(3 * 4096, 4096)
    q.desc, q.avail = base, base + 16 * size
    q.used = (q.avail + 6 + 2 * size + 4095) // 4096 * 4096
    d.wr(m.QUEUE_NUM, size)
    d.wr(m.QUEUE_ALIGN, 4096)
    d.wr(m.QUEUE_PFN, base // 4096)
    assert d.rd(m.QUEUE_PFN) == base // 4096
    assert (t.queues[0].desc, t.queues[0].driver, t.queues[0].device) == (q.desc, q.avail, q.used)
    d.queues = [q]
    d.set_status(vd.DRIVER_OK)
    assert t.activated and not d.status() & vd.DEVICE_NEEDS_RESET
    payload = bytes(range(256)) * 2
    assert d.run(T_OUT, 3, data=payload)[0] == 0
    assert d.run(T_IN, 3, read_len=512)[1] == payload
    assert r.disk()[3 * 512:4 * 512] == payload
    r.close()
