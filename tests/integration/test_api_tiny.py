"""The control API driving tiny ring-0 guests (milliseconds each): boot
through the API, real pause/resume (the guest's serial output stops and
restarts), Ctrl-Alt-Del scancodes reaching the guest through the i8042,
--config-file with --no-api, pyvmm-firecracker's flags."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import vmm.testing.tinyguest as T
from vmm.api.client import ApiClient, wait_for_socket
from vmm.testing.waiting import SLOW
from vmm.machine import STATUS

pytestmark = pytest.mark.usefixtures("needs_kvm")


class Output:
    """A process's stdout collected on a thread."""

    def __init__(self, stream):
        self.data = bytearray()
        self.t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.t.start()

    def _read(self, stream):
        while True:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                return
            self.data += chunk

    def wait_for(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.data) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.data) >= n

    def caught_up(self, stream, timeout=SLOW):
        """len(data) once everything already written to `stream` has been
        collected: the pipe is empty and nothing arrived for a while (the
        reader thread may lag behind the writer on a loaded machine).  A
        writer that does not stop makes this time out; the caller's next
        check then fails as it should."""
        import fcntl
        import termios
        buf = bytearray(4)
        end = time.monotonic() + timeout
        n = -1
        while time.monotonic() < end:
            fcntl.ioctl(stream.fileno(), termios.FIONREAD, buf)
            if int.from_bytes(buf, "little") == 0 and len(self.data) == n:
                break
            n = len(self.data)
            time.sleep(0.1)
        return len(self.data)


@pytest.fixture
def vmm_api(tmp_path):
    """Start `pyvmm api`; yields (process, client, output)."""
    sock = str(tmp_path / "api.sock")
    p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert wait_for_socket(sock, 60, p), p.stderr.read()
        out = Output(p.stdout)
        with ApiClient(sock) as api:
            yield p, api, out
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    assert not os.path.exists(sock)


def start(api, tmp_path, code):
    k = T.make_elf(code, str(tmp_path / "guest.elf"))
    api.put("/boot-source", {"kernel_image_path": k, "boot_args": "console=ttyS0"})
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    api.action("InstanceStart")


def test_pause_really_stops_the_guest(vmm_api, tmp_path):
    p, api, out = vmm_api
    start(api, tmp_path, T.TICKER)
    assert api.get("/")["state"] == "Running"
    assert out.wait_for(20)
    api.patch("/vm", {"state": "Paused"})
    assert api.get("/")["state"] == "Paused"
    n = out.caught_up(p.stdout)                     # what the guest wrote before the pause
    time.sleep(1.0)
    assert len(out.data) == n, "the guest wrote to its console while paused"
    api.patch("/vm", {"state": "Paused"})           # idempotent, as Firecracker
    api.patch("/vm", {"state": "Resumed"})
    assert api.get("/")["state"] == "Running"
    assert out.wait_for(n + 20), "no console output after resume"
    p.terminate()
    assert p.wait(60) == STATUS["signal"]


def test_send_ctrl_alt_del_reaches_the_guest_i8042(vmm_api, tmp_path):
    p, api, out = vmm_api
    start(api, tmp_path, T.KBD_ECHO)
    api.action("SendCtrlAltDel")
    assert out.wait_for(4)
    assert bytes(out.data[:4]) == bytes([0x14, 0x11, 0xE0, 0x71])   # set-2 make codes
    p.terminate()
    p.wait(60)


def test_instance_start_errors_keep_the_vmm_alive(vmm_api, tmp_path):
    p, api, out = vmm_api
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"not a kernel at all")
    api.put("/boot-source", {"kernel_image_path": str(bad)})
    status, obj = api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "InstanceStart" in obj["fault_message"]
    assert api.get("/")["state"] == "Not started"
    start(api, tmp_path, T.serial_text("ok\n") + T.CLI_HLT)     # a good one still boots
    assert p.wait(60) == 0
    assert out.wait_for(3) and bytes(out.data) == b"ok\n"


def test_config_file_without_api(tmp_path):
    k = T.make_elf(T.serial_text("from config\n") + T.CLI_HLT, str(tmp_path / "g.elf"))
    metrics = tmp_path / "metrics.json"
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({
        "boot-source": {"kernel_image_path": k, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "drives": [], "network-interfaces": [],
        "metrics": {"metrics_path": str(metrics)}}))
    p = subprocess.run([sys.executable, "-m", "vmm", "api", "--no-api", "--config-file", str(cfg)],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"from config\n"
    line = json.loads(metrics.read_text().splitlines()[-1])      # flushed on exit
    assert line["vcpu"]["exit_io_out"] >= len("from config\n")
    assert line["api_server"]["process_startup_time_us"] > 0


def test_config_file_errors_are_one_line(tmp_path):
    cfg = tmp_path / "vm.json"
    for doc, needle in [({"boot-source": {"kernel_image_path": "/nonexistent"}}, "no such file"),
                        ({"balloon": {"amount_mib": 1, "deflate_on_oom": False}}, "not supported"),
                        ({"bogus": {}}, "unknown section"),
                        ({"machine-config": {"vcpu_count": 1}}, "mem_size_mib")]:
        cfg.write_text(json.dumps(doc))
        p = subprocess.run([sys.executable, "-m", "vmm", "api", "--no-api", "--config-file",
                            str(cfg)], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        err = p.stderr.decode()
        assert p.returncode == 2 and needle in err and err.count("\n") == 1, err


def test_existing_socket_path_is_one_line_error(tmp_path):
    sock = tmp_path / "taken.sock"
    sock.write_text("")
    p = subprocess.run([sys.executable, "-m", "vmm", "api", "--api-sock", str(sock)],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    err = p.stderr.decode()
    assert p.returncode == 1 and "already exists" in err and err.count("\n") == 1, err


def test_pyvmm_firecracker_flags(tmp_path):
    fc = [sys.executable, "-c", "import sys; from vmm.api.cli import firecracker_main; "
                                "sys.exit(firecracker_main())"]
    v = subprocess.run(fc + ["--version"], capture_output=True, text=True, timeout=60)
    first = v.stdout.splitlines()[0]
    assert first.startswith("Firecracker v1.") and first.count(".") == 2
    k = T.make_elf(T.serial_text("fc\n") + T.CLI_HLT, str(tmp_path / "g.elf"))
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": k},
                               "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}))
    sock = str(tmp_path / "fc.sock")
    p = subprocess.run(fc + ["--api-sock", sock, "--id", "vm1", "--boot-timer",
                             "--seccomp-level", "2", "--config-file", str(cfg), "--level", "Debug",
                             "--log-path", str(tmp_path / "fc.log")],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"fc\n"
    assert not os.path.exists(sock)


def test_run_with_api_sock(tmp_path):
    """`pyvmm run --api-sock`: a VM started by hand can be inspected and paused."""
    k = T.make_elf(T.TICKER, str(tmp_path / "g.elf"))
    sock = str(tmp_path / "run.sock")
    p = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                          "--api-sock", sock, "--timeout", "600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert wait_for_socket(sock, 60, p)
        out = Output(p.stdout)
        with ApiClient(sock) as api:
            assert api.get("/")["state"] == "Running"
            cfg = api.get("/vm/config")
            assert cfg["boot-source"]["kernel_image_path"] == k
            assert cfg["machine-config"]["mem_size_mib"] == 32
            assert out.wait_for(10)
            api.patch("/vm", {"state": "Paused"})
            n = out.caught_up(p.stdout)
            time.sleep(0.5)
            assert len(out.data) == n
            api.patch("/vm", {"state": "Resumed"})
            assert out.wait_for(n + 10)
        p.terminate()
        assert p.wait(60) == STATUS["signal"]
        assert not os.path.exists(sock)
    finally:
        if p.poll() is None:
            p.kill()


def test_drives_attach_and_swap_under_a_running_tiny_guest(vmm_api, tmp_path):
    """The drive path through InstanceStart (specs from the API's model) and
    PATCH /drives swapping the image of an attached virtio-blk device."""
    p, api, out = vmm_api
    small, big = tmp_path / "small.img", tmp_path / "big.img"
    small.write_bytes(bytes(1 << 20))
    big.write_bytes(bytes(3 << 20))
    metrics = tmp_path / "m.json"
    api.put("/metrics", {"metrics_path": str(metrics)})
    api.put("/drives/data", {"drive_id": "data", "path_on_host": str(small),
                             "is_root_device": False, "is_read_only": True})
    fast = tmp_path / "fast.img"
    fast.write_bytes(bytes(1 << 20))
    api.put("/drives/fast", {"drive_id": "fast", "path_on_host": str(fast),
                             "is_root_device": False, "io_engine": "Async"})
    start(api, tmp_path, T.TICKER)
    api.patch("/drives/data", {"drive_id": "data", "path_on_host": str(big)})
    assert api.get("/")["state"] == "Running"             # resumed after the swap
    assert {d["drive_id"]: d["path_on_host"] for d in api.get("/vm/config")["drives"]}["data"] \
        == str(big)
    status, obj = api.request("PATCH", "/drives/data", {"drive_id": "data",
                                                        "path_on_host": str(tmp_path / "no.img")})
    assert status == 400 and "no such file" in obj["fault_message"]
    status, obj = api.request("PATCH", "/drives/fast", {"drive_id": "fast",
                                                        "path_on_host": str(small)})
    assert status == 400 and "Async" in obj["fault_message"]
    api.action("FlushMetrics")
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["block_data"]["update_count"] == 1
    assert out.wait_for(len(out.data) + 5)                # the guest still runs
    p.terminate()
    assert p.wait(60) == STATUS["signal"]


@pytest.mark.parametrize("kind", ["api", "main"])
def test_pyvmm_api_confines_its_threads_once_started(tmp_path, kind):
    """As `pyvmm run`: after InstanceStart the API thread and the main thread
    run under their seccomp filters (the self-test makes a forbidden call
    right after the filter is in); --no-seccomp leaves them unconfined."""
    k = T.make_elf(T.TICKER, str(tmp_path / "g.elf"))
    for extra, confined in (([], True), (["--no-seccomp"], False)):
        sock = str(tmp_path / f"sc{len(extra)}.sock")
        env = dict(os.environ, PYVMM_SECCOMP_SELFTEST=kind)
        p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock, *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, env=env)
        try:
            assert wait_for_socket(sock, 60, p)
            with ApiClient(sock) as api:
                assert api.get("/")["state"] == "Not started"     # unconfined before the VM
                api.put("/boot-source", {"kernel_image_path": k})
                api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
                try:
                    api.action("InstanceStart")
                except OSError:
                    pass                   # the VMM may end before it answers
            if confined:
                rc = p.wait(60)
                err = p.stderr.read().decode()
                assert rc == -31 and f"{kind} thread made a forbidden system call: sync" in err, err
            else:
                time.sleep(1)
                assert p.poll() is None
                p.terminate()
                assert p.wait(60) == STATUS["signal"]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
