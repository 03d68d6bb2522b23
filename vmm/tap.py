"""A tap interface as a virtio-net backend.

    tap = Tap("tap0")          # raises TapError (one line) on failure
    tap.fd                     # non-blocking; frames carry a virtio_net_hdr
    tap.set_vnet_hdr_len(12)
    tap.set_offload(lib.TUN_F_CSUM | ...)
    tap.close()                # a tap we created goes away with the fd

/dev/net/tun is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; with
`queues=N` > 1 it is opened N times with IFF_MULTI_QUEUE as well (one fd per
queue, `tap.fds`; `tap.fd` is the first), and `set_queue_enabled(i, on)`
attaches or detaches queue i (TUNSETQUEUE) so the kernel only steers frames
to queues somebody reads.  TUNSETIFF
attaches to the interface or creates it in the caller's network namespace
(of the calling thread).  A non-persistent tap lives exactly as long as its
fd, so one we create disappears when we close it; an existing persistent one
(`ip tuntap add`) is left as it was.  Nothing is configured on the host: no
address, no link state.
"""
import errno
import fcntl
import os
import socket
import struct

from vmm.native import ffi, lib

IFNAMSIZ = 16


class TapError(OSError):
    """A tap that cannot be used; the message is one line naming it."""


def parse_mac(text):
    """'52:54:00:12:34:56' -> 6 bytes; a unicast address (§5.1.4 mac)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"malformed MAC address {text!r} (expected XX:XX:XX:XX:XX:XX)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"malformed MAC address {text!r} (expected hex digits)") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    if mac == bytes(6):
        raise ValueError("MAC address 00:00:00:00:00:00 is not valid")
    return mac


def format_mac(mac):
    return ":".join(f"{b:02x}" for b in mac)


def check_name(name):
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r} (1 to {IFNAMSIZ - 1} characters, "
                         "no '/' or spaces)")
    return name


def _exists(name):
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


class Tap:
    def __init__(self, name, queues=1):
        check_name(name)
        self.name = name
        existed = _exists(name)
        self.fds = []
        self.fd = -1
        flags = lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR
        if queues > 1:
            flags |= lib.IFF_MULTI_QUEUE
        try:
            for _ in range(queues):
                try:
                    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as e:
                    raise TapError(e.errno, f"tap {name}: cannot open /dev/net/tun: {e.strerror}") from None
                self.fds.append(fd)
                out = ffi.new("char[]", IFNAMSIZ)
                r = lib.pv_tap_setiff(fd, self.name.encode(), flags, out)
                if r < 0:
                    raise TapError(-r, self._why(-r, existed or len(self.fds) > 1))
                self.name = ffi.string(out).decode()
            self.fd = self.fds[0]
            iff = lib.pv_tap_getiff_flags(self.fd)
            self.persistent = iff >= 0 and bool(iff & lib.IFF_PERSIST)
            self.created = not existed
            self.offload_ok = self._ioctl_int(lib.TUNSETOFFLOAD, 0) == 0
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            self.fds, self.fd = [], -1
            raise

    def _why(self, err, existed):
        n = self.name
        if err == errno.EPERM:
            return (f"tap {n}: permission denied (creating or attaching a tap needs "
                    "CAP_NET_ADMIN, or a persistent tap owned by this user)")
        if err == errno.EBUSY:
            return f"tap {n} is busy (attached to another process)"
        if err == errno.EINVAL and existed:
            return f"tap {n}: an interface of that name exists and is not a usable tap"
        return f"tap {n}: TUNSETIFF failed: {os.strerror(err)}"

    def _ioctl_int(self, req, value, fd=None):
        """TUNSETOFFLOAD takes its value as the argument; TUNSETVNETHDRSZ a
        pointer to an int (drivers/net/tun.c)."""
        arg = value if req == lib.TUNSETOFFLOAD else struct.pack("i", value)
        try:
            fcntl.ioctl(self.fd if fd is None else fd, req, arg)
            return 0
        except OSError as e:
            return e.errno

    def set_queue_enabled(self, index, on):
        """TUNSETQUEUE: attach (on) or detach queue `index` of a multi-queue
        tap; a detached queue gets no frames."""
        if len(self.fds) < 2:
            return
        ifr = struct.pack("16sH22x", b"", lib.IFF_ATTACH_QUEUE if on else lib.IFF_DETACH_QUEUE)
        try:
            fcntl.ioctl(self.fds[index], lib.TUNSETQUEUE, ifr)
        except OSError as e:
            if e.errno != errno.EINVAL:     # EINVAL: already in that state
                raise TapError(e.errno, f"tap {self.name}: TUNSETQUEUE {index}: {e.strerror}") from None

    def set_vnet_hdr_len(self, n):
        """TUNSETVNETHDRSZ: 10, or 12 with num_buffers (virtio 1.1 §5.1.6)."""
        err = self._ioctl_int(lib.TUNSETVNETHDRSZ, n)
        if err:
            raise TapError(err, f"tap {self.name}: TUNSETVNETHDRSZ {n}: {os.strerror(err)}")

    def set_offload(self, flags):
        """TUNSETOFFLOAD with TUN_F_* bits: what the tap may hand us unsegmented
        or without checksum (mirrors the driver's GUEST_* features)."""
        if not self.offload_ok:
            return
        err = self._ioctl_int(lib.TUNSETOFFLOAD, flags)
        if err:
            raise TapError(err, f"tap {self.name}: TUNSETOFFLOAD 0x{flags:x}: {os.strerror(err)}")

    def close(self):
        """Close the fds: a tap we created (non-persistent) disappears."""
        fds, self.fds, self.fd = self.fds, [], -1
        for fd in fds:
            os.close(fd)

    def __repr__(self):
        return f"Tap({self.name!r}, fd={self.fd}, created={getattr(self, 'created', None)})"
