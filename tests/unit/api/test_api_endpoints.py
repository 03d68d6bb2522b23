"""Every endpoint of the control API and every kind of bad request, over a
real Unix socket (server thread, no guest).  Post-boot behaviour that needs
a running guest (pause, drive swap, Ctrl-Alt-Del) is in
tests/integration/test_api_guest.py; here a stand-in machine only checks
the pre-/post-boot rules."""
import fcntl
import json
import os
import stat

import pytest

from vmm.api import routes
from vmm.api.schema import API_VERSION


class StandIn:
    """Just enough of a Machine for the state rules (no KVM)."""

    def __init__(self):
        self.paused = False
        self.config = type("C", (), {"devices": []})()
        self.threads = []

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False


def fault(api, method, url, body=None):
    status, obj = api.request(method, url, body)
    assert status == 400, (status, obj)
    assert set(obj) == {"fault_message"} and obj["fault_message"]
    return obj["fault_message"]


def test_socket_is_0600_and_existing_path_refused(server, ctl):
    from vmm.api.server import ApiServer, ApiSocketError
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    with pytest.raises(ApiSocketError, match="already exists"):
        ApiServer(server.path, ctl.handle).bind()


def test_instance_info_and_version(api):
    assert api.get("/") == {"id": "test-vm", "state": "Not started", "vmm_version": "0.1.0",
                            "app_name": "pyvmm"}
    assert api.get("/version") == {"firecracker_version": API_VERSION}


def test_machine_config_put_patch_get(api):
    assert api.get("/machine-config")["vcpu_count"] == 1
    assert api.get("/machine-config")["mem_size_mib"] == 128      # Firecracker's default
    api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"})
    api.patch("/machine-config", {"mem_size_mib": 512})
    m = api.get("/machine-config")
    assert (m["vcpu_count"], m["mem_size_mib"], m["cpu_template"]) == (2, 512, "T2")
    # PUT resets the optional fields to their defaults (firecracker.yaml)
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    assert api.get("/machine-config")["cpu_template"] == "None"


@pytest.mark.parametrize("body,needle", [
    ({"vcpu_count": 1}, "missing required field `mem_size_mib`"),
    ({"vcpu_count": "2", "mem_size_mib": 64}, "`vcpu_count` must be an integer"),
    ({"vcpu_count": True, "mem_size_mib": 64}, "`vcpu_count` must be an integer"),
    ({"vcpu_count": 0, "mem_size_mib": 64}, "at least 1"),
    ({"vcpu_count": 33, "mem_size_mib": 64}, "between 1 and 32"),
    ({"vcpu_count": 1, "mem_size_mib": 64, "smt": 1}, "`smt` must be a boolean"),
    ({"vcpu_count": 1, "mem_size_mib": 64, "smt": True}, "smt=true is not supported"),
    ({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "Z9"}, "must be one of"),
    ({"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}, "unknown field `bogus`"),
    ([1, 2], "must be a JSON object"),
])
def test_machine_config_errors(api, body, needle):
    assert needle in fault(api, "PUT", "/machine-config", body)
    assert api.get("/machine-config")["mem_size_mib"] == 128      # nothing changed


def test_boot_source(api, kernel, tmp_path):
    api.put("/boot-source", {"kernel_image_path": kernel, "boot_args": "console=ttyS0"})
    assert api.get("/vm/config")["boot-source"] == {"kernel_image_path": kernel,
                                                    "boot_args": "console=ttyS0"}
    assert "no such file" in fault(api, "PUT", "/boot-source",
                                   {"kernel_image_path": str(tmp_path / "none")})
    assert "no such file" in fault(api, "PUT", "/boot-source",
                                   {"kernel_image_path": kernel, "initrd_path": "/nonexistent"})
    assert "missing required field `kernel_image_path`" in fault(api, "PUT", "/boot-source",
                                                                  {"boot_args": "x"})


def test_drives(api, disk, tmp_path):
    api.put("/drives/data", {"drive_id": "data", "path_on_host": disk, "is_root_device": False})
    api.put("/drives/root", {"drive_id": "root", "path_on_host": disk, "is_root_device": True,
                             "is_read_only": True, "cache_type": "Writeback", "io_engine": "Sync"})
    cfg = api.get("/vm/config")
    assert [d["drive_id"] for d in cfg["drives"]] == ["data", "root"]
    assert cfg["drives"][1]["is_read_only"] is True
    # a root device is put first and named on the command line, as Firecracker does
    assert "root=/dev/vda ro" in api_config(api).cmdline()
    assert "does not match" in fault(api, "PUT", "/drives/x",
                                     {"drive_id": "y", "path_on_host": disk, "is_root_device": False})
    assert "root block device already exists" in fault(
        api, "PUT", "/drives/r2", {"drive_id": "r2", "path_on_host": disk, "is_root_device": True})
    assert "no such file" in fault(api, "PUT", "/drives/x", {
        "drive_id": "x", "path_on_host": str(tmp_path / "missing.img"), "is_root_device": False})
    assert "missing required field `is_root_device`" in fault(
        api, "PUT", "/drives/x", {"drive_id": "x", "path_on_host": disk})
    assert "path_on_host" in fault(api, "PUT", "/drives/x", {"drive_id": "x", "is_root_device": False})
    assert "rate_limiter.bandwidth: size and refill_time are required" in fault(
        api, "PUT", "/drives/x", {"drive_id": "x", "path_on_host": disk, "is_root_device": False,
                                  "rate_limiter": {"bandwidth": {"size": 1}}})
    assert "must be one of" in fault(api, "PUT", "/drives/x", {
        "drive_id": "x", "path_on_host": disk, "is_root_device": False, "cache_type": "Fast"})
    # null is "absent", as serde's Option
    api.put("/drives/x", {"drive_id": "x", "path_on_host": disk, "is_root_device": False,
                          "rate_limiter": None})
    # a busy disk (another process holds its lock)
    fd = os.open(disk, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "in use" in fault(api, "PUT", "/drives/y", {
            "drive_id": "y", "path_on_host": disk, "is_root_device": False})
    finally:
        os.close(fd)
    # PATCH is post-boot only
    assert "before starting" in fault(api, "PATCH", "/drives/x",
                                      {"drive_id": "x", "path_on_host": disk})


def api_config(api):
    """The VmConfig rebuilt from GET /vm/config (it must be enough to recreate the VM)."""
    from vmm.api.controller import Controller
    c = Controller()
    doc = api.get("/vm/config")
    for d in doc["drives"]:
        assert c.handle("PUT", f"/drives/{d['drive_id']}", json.dumps(d).encode())[0] == 204
    return c.config


def test_network_interfaces(api):
    api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "guest_mac": "52:54:00:00:00:01"})
    assert api.get("/vm/config")["network-interfaces"] == [
        {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:00:00:01"}]
    assert "MAC" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "zz:54:00:00:00:01"})
    assert "multicast" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "01:00:00:00:00:01"})
    assert "already used" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "tap0"})
    assert "already used" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "52:54:00:00:00:01"})
    assert "invalid interface name" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "a/b"})
    assert "unknown field `bw`" in fault(api, "PUT", "/network-interfaces/eth1", {
        "iface_id": "eth1", "host_dev_name": "tap1", "rx_rate_limiter": {"bw": {}}})
    assert "missing required field `host_dev_name`" in fault(
        api, "PUT", "/network-interfaces/eth1", {"iface_id": "eth1"})
    assert "before starting" in fault(api, "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"})


def test_logger_and_metrics(api, tmp_path, ctl):
    log = tmp_path / "vmm.log"
    api.put("/logger", {"log_path": str(log), "level": "debug", "show_level": True})
    import logging
    logging.getLogger("pyvmm.test").info("hello from the test")
    assert "INFO hello from the test" in log.read_text()
    assert "must be one of" in fault(api, "PUT", "/logger", {"level": "Loud"})
    assert "cannot open log file" in fault(api, "PUT", "/logger",
                                           {"log_path": str(tmp_path / "no" / "dir")})
    logging.getLogger("pyvmm").removeHandler(ctl._log_handler)
    ctl._log_handler.close()
    logging.getLogger("pyvmm").setLevel(logging.WARNING)

    assert "not initialized" in fault(api, "PUT", "/actions", {"action_type": "FlushMetrics"})
    m = tmp_path / "metrics.json"
    api.put("/metrics", {"metrics_path": str(m)})
    assert "already initialized" in fault(api, "PUT", "/metrics", {"metrics_path": str(m)})
    api.get("/")
    api.action("FlushMetrics")
    api.get("/")
    api.get("/")
    api.action("FlushMetrics")
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["get_api_requests"]["instance_info_count"] == 1
    assert lines[1]["get_api_requests"]["instance_info_count"] == 2       # deltas
    assert lines[0]["put_api_requests"]["metrics_fails"] == 1
    assert lines[1]["utc_timestamp_ms"] >= lines[0]["utc_timestamp_ms"]
    assert api.get("/vm/config")["metrics"] == {"metrics_path": str(m)}
    ctl.metrics.close()


def test_periodic_metrics_flush(api, tmp_path, ctl, monkeypatch):
    from vmm.api import metrics
    m = tmp_path / "metrics.json"
    api.put("/metrics", {"metrics_path": str(m)})
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL", 0.0)
    monkeypatch.setattr(ctl.metrics, "due", lambda interval=0.0: True)
    import time
    deadline = time.monotonic() + 30        # (a whole first line: the flusher is a thread)
    while not m.read_text().endswith("\n") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(m.read_text().splitlines()[0])["put_api_requests"]["metrics_count"] == 1
    ctl.metrics.close()


def test_actions_and_vm_before_boot(api, kernel):
    assert "before starting" in fault(api, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert "must be one of" in fault(api, "PUT", "/actions", {"action_type": "Reboot"})
    assert "before starting" in fault(api, "PATCH", "/vm", {"state": "Paused"})
    assert "must be one of" in fault(api, "PATCH", "/vm", {"state": "Sleeping"})
    assert "no boot source" in fault(api, "PUT", "/actions", {"action_type": "InstanceStart"})


def test_post_boot_rules(api, ctl, kernel, disk):
    ctl.attach(StandIn())
    assert api.get("/")["state"] == "Running"
    api.patch("/vm", {"state": "Paused"})
    assert api.get("/")["state"] == "Paused"
    api.patch("/vm", {"state": "Resumed"})
    assert api.get("/")["state"] == "Running"
    assert "already running" in fault(api, "PUT", "/actions", {"action_type": "InstanceStart"})
    for url, body in [("/boot-source", {"kernel_image_path": kernel}),
                      ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                      ("/drives/d", {"drive_id": "d", "path_on_host": disk, "is_root_device": False}),
                      ("/network-interfaces/n", {"iface_id": "n", "host_dev_name": "tap9"})]:
        assert "after starting" in fault(api, "PUT", url, body)
    assert "after starting" in fault(api, "PATCH", "/machine-config", {"mem_size_mib": 64})
    assert "no drive with id" in fault(api, "PATCH", "/drives/zz", {"drive_id": "zz"})


@pytest.mark.parametrize("url", [
                                 "/balloon", "/mmds", "/cpu-config"])
def test_other_issues_endpoints_refused(api, url):
    msg = fault(api, "PUT", url, {"x": 1})
    assert "not supported" in msg


def test_unknown_paths_and_methods(api):
    assert "invalid request method and/or path" in fault(api, "GET", "/nope")
    assert "invalid request method and/or path" in fault(api, "GET", "/drives")
    assert "invalid request method DELETE" in fault(api, "DELETE", "/machine-config")
    assert "invalid request method GET" in fault(api, "GET", "/actions")
    assert "takes no body" in fault(api, "GET", "/", {"a": 1})


def test_malformed_bodies(api, server):
    import socket
    for body in (b"{", b"\xff\xfe{}", b"", b"null", b"[" * 100000):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
        s.sendall(b"PUT /boot-source HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = recv_response(s)
        s.close()
        assert data.startswith(b"HTTP/1.1 400 "), data
        assert b"fault_message" in data
    assert api.get("/")["state"] == "Not started"


_pending = {}


def recv_response(s):
    """One HTTP response from socket `s` (bytes kept for the next call)."""
    s.settimeout(5)
    data = _pending.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    if head.startswith(b"HTTP/1.1 100"):
        n = 0
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if len(body) > n:
        _pending[s.fileno()] = body[n:]
    return head + b"\r\n\r\n" + body[:n]


def test_keep_alive_pipelining_and_expect(server):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /version HTTP/1.1\r\n\r\n")
    a = recv_response(s)
    b = recv_response(s)
    assert b"Not started" in a and b"firecracker_version" in b
    body = json.dumps({"vcpu_count": 1, "mem_size_mib": 64}).encode()
    s.sendall(b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    assert recv_response(s) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(body)
    assert recv_response(s).startswith(b"HTTP/1.1 204 ")
    s.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert b"Connection: close" in recv_response(s)
    assert s.recv(10) == b""          # closed by the server
    s.close()


def test_routes_have_handlers():
    from vmm.api.controller import Controller
    from vmm.api.schema import SCHEMAS
    for r in routes.ROUTES:
        for method, (schema, name) in r.methods.items():
            assert callable(getattr(Controller, name)), name
            assert schema is None or schema in SCHEMAS


def test_rate_limiters_and_entropy_pre_boot(api, ctl, kernel, tmp_path):
    """Issue #12: rate_limiter on drives and NICs, PUT /entropy; zero-size
    buckets are Firecracker's "disabled"; GET /vm/config shows them."""
    disk = str(tmp_path / "rl.img")
    with open(disk, "wb") as f:
        f.write(bytes(4096))
    lim = {"bandwidth": {"size": 1048576, "refill_time": 100},
           "ops": {"size": 100, "one_time_burst": 10, "refill_time": 100}}
    api.put("/drives/rl", {"drive_id": "rl", "path_on_host": disk, "is_root_device": False,
                           "rate_limiter": lim})
    api.put("/network-interfaces/n1", {"iface_id": "n1", "host_dev_name": "tap7",
                                       "rx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}},
                                       "tx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}})
    api.put("/entropy", {"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 1000}}})
    cfg = api.get("/vm/config")
    drive = next(d for d in cfg["drives"] if d["drive_id"] == "rl")
    assert drive["rate_limiter"] == {
        "bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 100},
        "ops": {"size": 100, "one_time_burst": 10, "refill_time": 100}}
    net = next(n for n in cfg["network-interfaces"] if n["iface_id"] == "n1")
    assert "rx_rate_limiter" not in net and net["tx_rate_limiter"]["ops"]["size"] == 5
    assert cfg["entropy"]["rate_limiter"]["bandwidth"]["size"] == 4096
    # ... and the devices InstanceStart would build carry them
    api.put("/boot-source", {"kernel_image_path": kernel})
    specs = {type(d).__name__: d for d in ctl.config.to_machine_config().devices}
    assert specs["NetSpec"].slow["tx_limiter"].ops.size == 5 and "rx_limiter" not in specs["NetSpec"].slow
    assert specs["DriveSpec"].slow["limiter"].bandwidth.size == 1048576
    assert specs["RngSpec"].rate_limiter.bandwidth.size == 4096
    assert "rate_limiter.ops: size and refill_time must be positive" in fault(api, "PUT", "/entropy", {
        "rate_limiter": {"ops": {"size": -1, "refill_time": 5}}})
    assert "unknown field" in fault(api, "PUT", "/entropy", {"rate": 1})


class _Spec:
    def __init__(self, dev, **ids):
        self.device = dev
        self.__dict__.update(ids)


@pytest.fixture
def live_devices(api, ctl, disk):
    """Drive "d" and NIC "n" configured through the API and attached to a
    stand-in running machine as real devices: (blk, net)."""
    from vmm.virtio.blk import BlkDevice
    from vmm.virtio.net import NetDevice
    api.put("/drives/d", {"drive_id": "d", "path_on_host": disk, "is_root_device": False})
    api.put("/network-interfaces/n", {"iface_id": "n", "host_dev_name": "tap5"})
    from vmm.testing.sockbackend import SockBackend
    blk, net = BlkDevice(disk), NetDevice(SockBackend(bufsize=0))
    m = StandIn()
    m.config.devices = [_Spec(blk, drive_id="d"), _Spec(net, iface_id="n")]
    ctl.attach(m)
    yield blk, net
    blk.close()
    net.close()


def test_patch_rate_limiters_apply_to_running_devices(api, live_devices):
    """PATCH /drives and /network-interfaces change the limiter of the live
    device (issue #12): a bucket given replaces, one left out stays, a
    disabled one (size 0) goes, and with none left the C fast path is back."""
    blk, net = live_devices
    api.patch("/drives/d", {"drive_id": "d", "rate_limiter": {
        "bandwidth": {"size": 1000, "refill_time": 10}, "ops": {"size": 5, "refill_time": 10}}})
    lim = blk.intercept.limiter
    assert (lim.bandwidth.size, lim.ops.size) == (1000, 5)
    api.patch("/drives/d", {"drive_id": "d", "rate_limiter": {
        "ops": {"size": 7, "refill_time": 10}}})
    assert (lim.bandwidth.size, lim.ops.size) == (1000, 7)       # bandwidth kept
    api.patch("/drives/d", {"drive_id": "d", "rate_limiter": {
        "bandwidth": {"size": 0, "refill_time": 0}, "ops": {"size": 0, "refill_time": 0}}})
    assert blk.intercept is None                                  # fast path again
    api.patch("/network-interfaces/n", {"iface_id": "n",
                                        "tx_rate_limiter": {"ops": {"size": 3, "refill_time": 9}}})
    assert net.intercept.tx_limiter.ops.size == 3 and net.intercept.rx_limiter is None
    cfg = api.get("/vm/config")
    assert cfg["network-interfaces"][0]["tx_rate_limiter"]["ops"]["size"] == 3
    assert "size and refill_time are required" in fault(
        api, "PATCH", "/network-interfaces/n",
        {"iface_id": "n", "rx_rate_limiter": {"ops": {"size": 3}}})


def test_patch_faults_extension(api, live_devices):
    """pyvmm's `faults` on PATCH (issue #15): rules on the running disk, a
    link switch on the NIC (config interrupt), "" removes them."""
    blk, net = live_devices
    api.patch("/drives/d", {"drive_id": "d", "faults": "read-error@8-15;seed=3"})
    assert blk.faults_counts() == {"read-error@8-15": 0}
    assert "unknown disk rule 'read-eror'" in fault(
        api, "PATCH", "/drives/d", {"drive_id": "d", "faults": "read-eror@1"})
    api.patch("/drives/d", {"drive_id": "d", "faults": ""})
    assert blk.intercept is None
    assert net.config_bytes()[6] == 1
    api.patch("/network-interfaces/n", {"iface_id": "n", "faults": "link=down"})
    assert net.config_bytes()[6] == 0                 # VIRTIO_NET_S_LINK_UP off
    api.patch("/network-interfaces/n", {"iface_id": "n", "faults": ""})
    assert net.config_bytes()[6] == 1 and net.intercept is None
