"""virtio-blk (virtio 1.1 §5.2) through the mmio transport and a mock driver,
native and pure-Python engines alike."""
import os
import struct
import subprocess
import sys

import pytest

from vmm.virtio import blk as b
from vmm.virtio import device as vd
from vmm.virtio.blk import BlkDevice, BlkError
from vmm.testing.mockdriver import T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES

from virtio_rig import IMAGE_SIZE

CAP = IMAGE_SIZE // 512


def seg(sector, num, flags=0):
    return struct.pack("<QII", sector, num, flags)


@pytest.mark.parametrize("split,indirect", [(1, False), (3, False), (1, True), (7, True)])
def test_read(rig, split, indirect):
    r = rig()
    disk = r.disk()
    status, data, used_len = r.d.run(T_IN, 5, read_len=8192, split=split, indirect=indirect)
    assert status == b.S_OK
    assert data == disk[5 * 512:5 * 512 + 8192]
    assert used_len == 8192 + 1
    assert r.d.check_guards() == []


def test_write_split_across_many_buffers(rig):
    r = rig()
    before = r.disk()
    payload = os.urandom(64 * 1024)
    status, _, used_len = r.d.run(T_OUT, 100, data=payload, split=37)  # uneven pieces
    assert (status, used_len) == (b.S_OK, 1)
    after = r.disk()
    assert after[100 * 512:100 * 512 + len(payload)] == payload
    assert after[:100 * 512] == before[:100 * 512]
    assert after[100 * 512 + len(payload):] == before[100 * 512 + len(payload):]
    assert r.d.check_guards() == []


def test_write_then_read_back_indirect(rig):
    r = rig()
    payload = os.urandom(4096)
    assert r.d.run(T_OUT, 9, data=payload, indirect=True, split=4)[0] == b.S_OK
    assert r.d.run(T_IN, 9, read_len=4096, indirect=True, split=2)[1] == payload


def test_flush_syncs(rig, monkeypatch):
    r = rig()
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd) or real(fd))
    assert r.d.run(T_FLUSH)[0] == b.S_OK
    if not r.dev.native:     # the C engine calls fdatasync itself
        assert calls == [r.dev.fd]
    # fdatasync really reaches the fd: on a pipe it fails, so FLUSH -> IOERR
    rfd, wfd = os.pipe()
    real_fd = r.dev.fd
    r.dev.fd = r.dev._blk.fd = rfd
    try:
        assert r.d.run(T_FLUSH)[0] == b.S_IOERR
    finally:
        r.dev.fd = r.dev._blk.fd = real_fd
        os.close(rfd)
        os.close(wfd)


@pytest.mark.parametrize("serial,room,expect", [
    ("disk-0", 20, b"disk-0".ljust(20, b"\0")),
    ("A" * 20, 20, b"A" * 20),
    ("serial-number", 8, b"serial-n"),
])
def test_get_id(mem, image, native, serial, room, expect):
    from virtio_rig import Rig
    r = Rig(mem, image, native, serial=serial)
    status, data, used_len = r.d.run(T_GET_ID, read_len=room)
    assert (status, data, used_len) == (b.S_OK, expect, len(expect) + 1)
    r.close()


def test_serial_too_long(image):
    with pytest.raises(BlkError, match="serial"):
        BlkDevice(image, serial="x" * 21)


def test_write_zeroes(rig):
    r = rig()
    before = r.disk()
    for flags, sector in ((0, 10), (1, 40)):          # plain, and with UNMAP allowed
        status, _, _ = r.d.run(T_WRITE_ZEROES, data=seg(sector, 16, flags))
        assert status == b.S_OK
    after = r.disk()
    assert len(after) == IMAGE_SIZE
    assert after[10 * 512:26 * 512] == bytes(16 * 512)
    assert after[40 * 512:56 * 512] == bytes(16 * 512)
    assert after[:10 * 512] == before[:10 * 512]
    assert after[26 * 512:40 * 512] == before[26 * 512:40 * 512]
    assert after[56 * 512:] == before[56 * 512:]


def test_write_zeroes_many_segments(rig):
    r = rig()
    status, _, _ = r.d.run(T_WRITE_ZEROES, data=seg(0, 8) + seg(100, 8) + seg(CAP - 8, 8), split=3)
    assert status == b.S_OK
    disk = r.disk()
    for s in (0, 100, CAP - 8):
        assert disk[s * 512:(s + 8) * 512] == bytes(4096)


def test_discard(rig):
    r = rig()
    before = r.disk()
    # 4 KiB-aligned so a hole can really be punched
    assert r.d.run(T_DISCARD, data=seg(64, 64))[0] == b.S_OK
    after = r.disk()
    assert len(after) == IMAGE_SIZE                   # KEEP_SIZE
    assert after[:64 * 512] == before[:64 * 512]
    assert after[128 * 512:] == before[128 * 512:]


@pytest.mark.parametrize("typ,segment,expect", [
    (T_DISCARD, seg(0, 8, 1), b.S_UNSUPP),             # UNMAP on discard (§5.2.6.2)
    (T_WRITE_ZEROES, seg(0, 8, 2), b.S_UNSUPP),        # reserved flag
    (T_DISCARD, seg(CAP - 4, 8), b.S_IOERR),           # past the end
    (T_WRITE_ZEROES, seg(CAP, 1), b.S_IOERR),
    (T_DISCARD, seg(0, 8)[:12], b.S_IOERR),            # not a whole segment
    (T_WRITE_ZEROES, seg(0, 1) * 33, b.S_IOERR),       # more than max_write_zeroes_seg
])
def test_discard_write_zeroes_errors(rig, typ, segment, expect):
    r = rig()
    before = r.disk()
    assert r.d.run(typ, data=segment)[0] == expect
    assert r.disk() == before


@pytest.mark.parametrize("typ,sector,length", [
    (T_IN, CAP - 1, 1024), (T_IN, CAP, 512), (T_IN, 2 ** 63, 512), (T_IN, 0, 100),
    (T_OUT, CAP - 1, 1024), (T_OUT, 2 ** 64 - 1, 512), (T_OUT, 0, 700),
])
def test_past_end_and_misaligned_is_ioerr(rig, typ, sector, length):
    r = rig()
    before = r.disk()
    kw = {"read_len": length} if typ == T_IN else {"data": b"\x77" * length}
    status, data, used_len = r.d.run(typ, sector, **kw)
    assert (status, used_len) == (b.S_IOERR, 1)
    assert r.disk() == before
    assert r.d.check_guards() == []
    if typ == T_IN:
        assert data == b"\x5a" * length                # buffer untouched


def test_read_last_sector(rig):
    r = rig()
    status, data, _ = r.d.run(T_IN, CAP - 1, read_len=512)
    assert status == b.S_OK and data == r.disk()[-512:]


@pytest.mark.parametrize("typ", [2, 3, 99, 0xFFFFFFFF])
def test_unknown_type_unsupp(rig, typ):
    r = rig()
    before = r.disk()
    assert r.d.run(typ, data=b"z" * 512)[0] == b.S_UNSUPP
    assert r.d.run(typ, read_len=512)[0] == b.S_UNSUPP
    assert r.disk() == before
    assert r.t.status & vd.DEVICE_NEEDS_RESET == 0


def test_readonly(rig):
    r = rig(readonly=True)
    before = r.disk()
    assert r.dev.features >> b.VIRTIO_BLK_F_RO & 1
    assert not r.dev.features >> b.VIRTIO_BLK_F_DISCARD & 1
    assert r.d.features >> b.VIRTIO_BLK_F_RO & 1
    assert r.d.run(T_OUT, 0, data=b"w" * 512)[0] == b.S_IOERR
    assert r.d.run(T_WRITE_ZEROES, data=seg(0, 8))[0] == b.S_IOERR
    assert r.d.run(T_DISCARD, data=seg(0, 8))[0] == b.S_IOERR
    assert r.d.run(T_IN, 0, read_len=512)[1] == before[:512]
    assert r.d.run(T_FLUSH)[0] == b.S_OK
    with pytest.raises(OSError):
        os.pwrite(r.dev.fd, b"x", 0)                    # opened O_RDONLY
    assert r.disk() == before


def test_exclusive_lock(image):
    first = BlkDevice(image)
    with pytest.raises(BlkError, match=r"disk image .*disk.img is in use by another process"):
        BlkDevice(image)
    with pytest.raises(BlkError, match="in use"):
        BlkDevice(image, readonly=True)
    first.close()
    BlkDevice(image).close()                            # free again after close


def test_exclusive_lock_across_processes(image):
    dev = BlkDevice(image)
    code = ("import sys\nfrom vmm.virtio.blk import BlkDevice, BlkError\n"
            "try:\n    BlkDevice(sys.argv[1])\nexcept BlkError as e:\n    print(e); sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))))
    dev.close()
    assert p.returncode == 3, p.stderr
    assert "in use by another process" in p.stdout


def test_open_errors(tmp_path):
    with pytest.raises(BlkError, match="cannot open disk image .*missing.img: No such file"):
        BlkDevice(str(tmp_path / "missing.img"))
    with pytest.raises(BlkError, match="not a regular file"):
        BlkDevice(str(tmp_path), readonly=True)


def test_close_flushes_and_is_idempotent(image, monkeypatch):
    dev = BlkDevice(image)
    fd = dev.fd
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda f: synced.append(f) or real(f))
    dev.close()
    dev.close()
    assert synced == [fd]
    with pytest.raises(OSError):
        os.fstat(fd)


def test_config_space(rig):
    r = rig(serial="s")
    d = r.d
    assert d.config(0, 8) == CAP
    assert d.config(0) == CAP & 0xFFFFFFFF and d.config(4) == CAP >> 32
    assert d.config(8) == b.SIZE_MAX
    assert d.config(12) == r.dev.queue_max_sizes[0] - 2        # seg_max
    assert d.config(20) == 512                                 # blk_size
    assert d.config(36) == b.MAX_DISCARD_SECTORS
    assert d.config(40) == b.MAX_DISCARD_SEG
    assert d.config(44) == b.DISCARD_ALIGNMENT
    assert d.config(48) == b.MAX_DISCARD_SECTORS
    assert d.config(52) == b.MAX_DISCARD_SEG
    assert d.config(56, 1) == 1                                # write_zeroes_may_unmap
    assert d.config(0, 1) == CAP & 0xFF and d.config(1, 2) == (CAP >> 8) & 0xFFFF
    assert d.config(60) == 0                                   # past the structure
    assert struct.calcsize(b.CONFIG_FORMAT) == 60
    for bit in (b.VIRTIO_BLK_F_SIZE_MAX, b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_BLK_SIZE,
                b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES,
                vd.VIRTIO_F_VERSION_1, vd.VIRTIO_F_RING_EVENT_IDX, vd.VIRTIO_F_RING_INDIRECT_DESC):
        assert d.features >> bit & 1, bit
    assert not d.features >> b.VIRTIO_BLK_F_RO & 1


@pytest.mark.parametrize("typ", [T_WRITE_ZEROES, T_DISCARD])
# Cheap even when the bug is present (a regression must not fill the disk):
# past the end, straddling the end, and an unchecked in-range sector.
@pytest.mark.parametrize("evil", [seg(CAP + 1024, 8), seg(CAP - 8, 2048), seg(0, 8)],
                         ids=["past-end", "straddle", "other-sector"])
def test_segment_swapped_after_check_is_not_used(rig, typ, evil):
    """Issue #14: a second vCPU rewrites the segment between the device's
    check and its use.  The device must act on the copy it checked: the image
    keeps its size and nothing outside the checked range changes."""
    from vmm.native import ffi, lib
    r = rig()
    if not r.dev.native:
        pytest.skip("the hook is in the C engine; the Python engine copies the payload once")
    before = r.disk()
    req = r.d.submit(typ, data=seg(8, 8))
    (gpa, n), = req.data
    fired = []

    @ffi.callback("void(void *)")
    def swap(_arg):
        r.d.mem.write(gpa, evil)
        fired.append(1)
    lib.pv_blk_seg_hook = swap
    try:
        r.d.kick()
    finally:
        lib.pv_blk_seg_hook = ffi.NULL
    assert fired
    assert dict(r.d.queues[0].get_used())[req.head] == 1
    assert r.d.result(req)[0] == b.S_OK
    st = os.stat(r.image)
    assert st.st_size == IMAGE_SIZE
    assert st.st_blocks * 512 <= IMAGE_SIZE           # nothing allocated past the end
    after = r.disk()
    assert after[:8 * 512] == before[:8 * 512] and after[16 * 512:] == before[16 * 512:]
    if typ == T_WRITE_ZEROES:
        assert after[8 * 512:16 * 512] == bytes(4096)
