"""The API's listening Unix socket, on its own so that `pyvmm api` can
create it before the rest of the VMM loads.

    fd = listen_unix(path)          # 0600, listening; an existing path is an error
    ...                             # clients can connect from here on
    ApiServer(path, handler, sock=fd).start()    # serves them (vmm/api/server.py)

It uses the C module _socket, not socket.py: socket.py's import (selectors,
its enum conversions) was a fifth of the time from process start to an
accepting socket.  The server wraps the descriptor in a socket.socket.
"""
import os

import _socket

BACKLOG = 1024             # connections the kernel queues before the server accepts them


class ApiSocketError(Exception):
    pass


def listen_unix(path, backlog=BACKLOG):
    """The descriptor of a non-blocking listening AF_UNIX socket at `path`,
    created 0600 (no window where another user could connect); raises
    ApiSocketError."""
    if os.path.lexists(path):
        raise ApiSocketError(f"API socket {path} already exists (another VMM running? "
                             "remove it first)")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ApiSocketError(f"cannot create API socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock.detach()


def close_unix(fd, path):
    """Close a listening socket (its descriptor) and remove its path."""
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
