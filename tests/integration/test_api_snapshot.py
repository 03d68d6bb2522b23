"""Snapshots through the control API with a tiny guest that prints the
alphabet: PUT /snapshot/create while paused (refused while running), then a
new `pyvmm api` process loads it with PUT /snapshot/load (paused until
PATCH /vm Resumed, or resume_vm) and the guest continues with the next
letter; load after boot and bad files are 400s with one line."""
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T
from vmm.api.client import ApiClient, ApiRequestError, wait_for_socket

from test_api_tiny import Output
from test_snapshot_tiny import ALPHABET, following

pytestmark = pytest.mark.usefixtures("needs_kvm")


class Vmm:
    def __init__(self, tmp_path, name):
        self.sock = str(tmp_path / f"{name}.sock")
        self.p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", self.sock],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        assert wait_for_socket(self.sock, 60, self.p), self.p.stderr.read()
        self.out = Output(self.p.stdout)
        self.api = ApiClient(self.sock, timeout=60)

    def fault(self, method, url, body):
        with pytest.raises(ApiRequestError) as e:
            getattr(self.api, method)(url, body)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    def close(self):
        self.api.close()
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)


@pytest.fixture
def vmms(tmp_path):
    made = []

    def make(name):
        v = Vmm(tmp_path, name)
        made.append(v)
        return v
    yield make
    for v in made:
        v.close()


def test_create_and_load_through_the_api(vmms, tmp_path):
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    a = vmms("a")
    k = T.make_elf(ALPHABET, str(tmp_path / "alpha.elf"))
    a.api.put("/boot-source", {"kernel_image_path": k, "boot_args": "console=ttyS0"})
    a.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": True})
    assert "before the microVM is started" in a.fault(
        "put", "/snapshot/create", {"snapshot_path": state, "mem_file_path": mem})
    a.api.action("InstanceStart")
    assert a.out.wait_for(3, 60)
    assert "pause it before" in a.fault("put", "/snapshot/create",
                                        {"snapshot_path": state, "mem_file_path": mem})
    a.api.patch("/vm", {"state": "Paused"})
    a.api.put("/snapshot/create", {"snapshot_type": "Full", "snapshot_path": state,
                                   "mem_file_path": mem})
    a.out.caught_up(a.p.stdout)         # our reader may lag behind what the guest wrote
    seen = bytes(a.out.data)
    assert "after starting" in a.fault("put", "/snapshot/load", {
        "snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}})
    a.close()

    b = vmms("b")                       # loaded paused: nothing runs until Resumed
    b.api.put("/snapshot/load", {"snapshot_path": state,
                                 "mem_backend": {"backend_type": "File", "backend_path": mem}})
    assert b.api.get("/")["state"] == "Paused"
    assert not b.out.wait_for(1, 1.0)
    b.api.patch("/vm", {"state": "Resumed"})
    assert b.out.wait_for(3, 60)
    assert bytes(b.out.data).startswith(following(seen)), (seen[-5:], bytes(b.out.data[:10]))

    c = vmms("c")                       # resume_vm: runs at once
    c.api.put("/snapshot/load", {"snapshot_path": state, "resume_vm": True,
                                 "mem_backend": {"backend_type": "File", "backend_path": mem}})
    assert c.out.wait_for(3, 60)
    assert bytes(c.out.data).startswith(following(seen))


def test_bad_loads_are_one_line_400s(vmms, tmp_path):
    v = vmms("v")
    state = tmp_path / "bad.state"
    state.write_bytes(b"PYVMMSNP" + bytes(60))
    mem = tmp_path / "m"
    mem.write_bytes(b"")
    for body, needle in [
        ({"snapshot_path": str(state)}, "memory file is missing"),
        ({"snapshot_path": str(state), "mem_backend": {"backend_type": "Uffd",
                                                       "backend_path": "/x"}}, "only File"),
        ({"snapshot_path": str(state), "mem_backend": {"backend_type": "File",
                                                       "backend_path": str(mem)}}, "version"),
        ({"snapshot_path": str(tmp_path / "none"), "mem_file_path": str(mem)}, "No such file"),
        ({"mem_file_path": str(mem)}, "snapshot_path"),
    ]:
        assert needle in v.fault("put", "/snapshot/load", body)
    assert v.api.get("/")["state"] == "Not started"      # still usable


def test_pyvmm_snapshot_command_then_restore(tmp_path):
    sock, state, mem = str(tmp_path / "r.sock"), str(tmp_path / "s"), str(tmp_path / "m")
    k = T.make_elf(ALPHABET, str(tmp_path / "alpha.elf"))
    p = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                          "--api-sock", sock, "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert wait_for_socket(sock, 60, p)
        out = Output(p.stdout)
        assert out.wait_for(3, 60)
        snap = [sys.executable, "-m", "vmm", "snapshot", "--api-sock", sock, "--snapshot", state,
                "--mem", mem]
        r = subprocess.run(snap + ["--type", "Diff"], capture_output=True, timeout=120)
        assert r.returncode == 1 and "dirty page tracking" in r.stderr.decode()
        assert r.stderr.decode().count("\n") == 1
        r = subprocess.run(snap, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        n = len(out.data)
        assert out.wait_for(n + 2, 60)              # resumed after the snapshot
    finally:
        p.kill()
        p.wait(30)
    rest = subprocess.run([sys.executable, "-m", "vmm", "restore", "--snapshot", state, "--mem", mem,
                           "--resume", "--timeout", "3"], capture_output=True, timeout=120)
    assert len(rest.stdout) >= 2 and set(rest.stdout) <= set(b"abcdefghijklmnopqrstuvwxyz")
