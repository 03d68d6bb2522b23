"""virtio-blk's request engine in Python: the algorithm of native/src/blk.c
over a `PyRing`, for BlkDevice(native=False) (the benchmark's pure-Python
figure and a cross-check of the C engine).  `dev` is the BlkDevice (its
fd, capacity, readonly flag, serial and budget); loaded only when such a
device first runs, so the usual start-up never imports it.

    completed, irq, err, ioerr, more = blk_py.process(dev, ring)
"""
import ctypes
import errno
import os
import struct

from vmm.virtio.blk_spec import (
    SECTOR, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, S_OK, S_IOERR, S_UNSUPP,
    WZ_F_UNMAP, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE)
from vmm.virtio.queue import E_REQ, QueueError


def process(dev, ring):
    completed = ioerr = err = more = 0
    budget = dev.budget
    try:
        while True:
            chain = ring.pop() if completed < budget else None
            while chain is not None:
                status, used_len = request(dev, chain)
                ioerr += status == S_IOERR
                ring.push(chain.head, used_len)
                completed += 1
                chain = ring.pop() if completed < budget else None
            if completed >= budget:
                more = 1
                break
            if not ring.enable_notify():
                break
    except QueueError as e:
        ring.fail(e.code)
        err = e.code
    irq = bool(completed) and ring.need_interrupt()
    return completed, irq, err, ioerr, more

def request(dev, chain):
    rd, wr = chain.readable, chain.writable
    read_len, write_len = chain.read_len, chain.write_len
    if read_len < 16 or write_len < 1:
        raise QueueError(E_REQ, 0)
    in_len, out_len = read_len - 16, write_len - 1
    typ, _, sector = struct.unpack("<IIQ", b"".join(v.tobytes() for v in _slice(rd, 0, 16)))
    status_view = _slice(wr, out_len, 1)[0]
    used_len, s = 1, S_UNSUPP
    if typ in (T_IN, T_GET_ID) and in_len:
        raise QueueError(E_REQ, 0)
    if typ in (T_OUT, T_DISCARD, T_WRITE_ZEROES, T_FLUSH) and out_len:
        raise QueueError(E_REQ, 0)
    if typ == T_FLUSH and in_len:
        raise QueueError(E_REQ, 0)
    if typ == T_IN:
        s = S_IOERR
        if out_len % SECTOR == 0 and in_range(dev, sector, out_len // SECTOR):
            if _rw_all(dev.fd, _slice(wr, 0, out_len), sector * SECTOR, False):
                s, used_len = S_OK, out_len + 1
    elif typ == T_OUT:
        s = S_IOERR
        if (not dev.readonly and in_len % SECTOR == 0
                and in_range(dev, sector, in_len // SECTOR)
                and _rw_all(dev.fd, _slice(rd, 16, in_len), sector * SECTOR, True)):
            s = S_OK
    elif typ == T_FLUSH:
        try:
            os.fdatasync(dev.fd)
            s = S_OK
        except OSError:
            s = S_IOERR
    elif typ == T_GET_ID:
        n = min(out_len, ID_BYTES)
        ident = dev.serial.ljust(ID_BYTES, b"\0")[:n]
        pos = 0
        for v in _slice(wr, 0, n):
            v[:] = memoryview(ident)[pos:pos + len(v)]
            pos += len(v)
        s, used_len = S_OK, n + 1
    elif typ in (T_DISCARD, T_WRITE_ZEROES):
        payload = b"".join(v.tobytes() for v in _slice(rd, 16, in_len))
        s = discard_wz(dev, payload, typ)
    status_view[0] = s
    return s, used_len

def in_range(dev, sector, nsectors):
    return sector <= dev.capacity and nsectors <= dev.capacity - sector

def discard_wz(dev, payload, typ):
    if dev.readonly or len(payload) % 16 or len(payload) // 16 > MAX_DISCARD_SEG:
        return S_IOERR
    segs = [struct.unpack_from("<QII", payload, i) for i in range(0, len(payload), 16)]
    for sector, num, flags in segs:
        if flags & ~WZ_F_UNMAP or (typ == T_DISCARD and flags & WZ_F_UNMAP):
            return S_UNSUPP
        if num > MAX_DISCARD_SECTORS or not in_range(dev, sector, num):
            return S_IOERR
    for sector, num, flags in segs:
        off, length = sector * SECTOR, num * SECTOR
        if not length:
            continue
        if typ == T_DISCARD:
            e = _fallocate(dev.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
            if e not in (0, errno.EOPNOTSUPP, errno.ENOSYS):
                return S_IOERR
            continue
        if flags & WZ_F_UNMAP and not _fallocate(
                dev.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length):
            continue
        if not _fallocate(dev.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, length):
            continue
        try:
            for pos in range(0, length, 1 << 16):
                os.pwrite(dev.fd, bytes(min(1 << 16, length - pos)), off + pos)
        except OSError:
            return S_IOERR
    return S_OK


def _slice(views, skip, length):
    """Views covering bytes [skip, skip+length) of a list of buffers."""
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        if take:
            out.append(v[skip:skip + take])
        length -= take
        skip = 0
        if not length:
            break
    return out


def _rw_all(fd, bufs, off, write):
    """preadv/pwritev until done; a read past the end of file reads zeros."""
    bufs = [memoryview(b) for b in bufs]
    try:
        while bufs:
            n = os.pwritev(fd, bufs, off) if write else os.preadv(fd, bufs, off)
            if n == 0:
                if write:
                    return False
                for b in bufs:
                    b[:] = bytes(len(b))
                return True
            off += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            if bufs and n:
                bufs[0] = bufs[0][n:]
    except OSError:
        return False
    return True


# dlopen(NULL): libc is already mapped in every Python process; find_library("c")
# would run /sbin/ldconfig -p in a child process at import (milliseconds of start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd, mode, off, length):
    """fallocate(2) with a mode (os has none); returns 0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()
