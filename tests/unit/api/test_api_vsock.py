"""PUT /vsock (Firecracker's Vsock resource) and the "vsock" section of
--config-file: validation with one-line faults, replacement before boot,
refusal after, and the device spec it becomes."""
import json

import pytest

from vmm.api.runner import apply_config_file
from vmm.devices import VsockSpec
from vmm.vmconfig import ConfigError

from test_api_endpoints import StandIn, fault


def test_put_vsock_and_vm_config(api, ctl, tmp_path, kernel):
    uds = str(tmp_path / "v.sock")
    api.put("/vsock", {"guest_cid": 3, "uds_path": uds, "vsock_id": "vsock0"})
    assert api.get("/vm/config")["vsock"] == {"guest_cid": 3, "uds_path": uds,
                                              "vsock_id": "vsock0"}
    api.put("/vsock", {"guest_cid": 7, "uds_path": uds})           # replaces it
    assert api.get("/vm/config")["vsock"] == {"guest_cid": 7, "uds_path": uds}
    api.put("/boot-source", {"kernel_image_path": kernel})
    devices = ctl.config.to_machine_config().devices
    spec = [d for d in devices if isinstance(d, VsockSpec)]
    assert len(spec) == 1 and (spec[0].cid, spec[0].uds_path) == (7, uds)


@pytest.mark.parametrize("body,msg", [
    ({"uds_path": "/tmp/v.sock"}, "missing required field `guest_cid`"),
    ({"guest_cid": 3}, "missing required field `uds_path`"),
    ({"guest_cid": 2, "uds_path": "/tmp/v.sock"}, "at least 3"),
    ({"guest_cid": 1 << 32, "uds_path": "/tmp/v.sock"}, "cid must be from 3"),
    ({"guest_cid": "3", "uds_path": "/tmp/v.sock"}, "must be an integer"),
    ({"guest_cid": 3, "uds_path": "/nonexistent-dir/v.sock"}, "does not exist"),
    ({"guest_cid": 3, "uds_path": ""}, "empty"),
    ({"guest_cid": 3, "uds_path": "/tmp/v.sock", "port": 5}, "unknown field"),
])
def test_put_vsock_bad_input(api, body, msg):
    m = fault(api, "PUT", "/vsock", body)
    assert msg in m and "\n" not in m


def test_put_vsock_after_boot_refused(api, ctl, tmp_path):
    ctl.attach(StandIn())
    assert "after starting" in fault(api, "PUT", "/vsock",
                                     {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})


def test_config_file_vsock_section(ctl, tmp_path, kernel):
    path = tmp_path / "vm.json"
    uds = str(tmp_path / "v.sock")
    path.write_text(json.dumps({"boot-source": {"kernel_image_path": kernel},
                                "vsock": {"guest_cid": 52, "uds_path": uds}}))
    apply_config_file(ctl, str(path))
    assert (ctl.config.vsock.guest_cid, ctl.config.vsock.uds_path) == (52, uds)
    path.write_text(json.dumps({"vsock": {"guest_cid": 0, "uds_path": uds}}))
    with pytest.raises(ConfigError, match="vsock: .*at least 3"):
        apply_config_file(ctl, str(path))
