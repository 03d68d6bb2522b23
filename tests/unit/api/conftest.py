"""A real API server on a Unix socket in a thread, no guest."""
import os

import pytest

from vmm.api.client import ApiClient
from vmm.api.controller import Controller
from vmm.api.server import ApiServer


@pytest.fixture
def ctl():
    return Controller("test-vm")


@pytest.fixture
def server(tmp_path, ctl):
    path = str(tmp_path / "api.sock")
    srv = ApiServer(path, ctl.handle, tick=ctl.tick)
    srv.start()
    yield srv
    srv.close()
    assert not os.path.exists(path)


@pytest.fixture
def api(server):
    c = ApiClient(server.path, timeout=30)
    yield c
    c.close()


@pytest.fixture
def kernel(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(b"\x7fELF not really a kernel")
    return str(p)


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(64 * 1024))
    return str(p)
