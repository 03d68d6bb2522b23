"""`--vsock` parsing (vmm.devices.VsockSpec) and its one-line errors, and
the device on legacy virtio-pci."""
import pytest

from vmm.cli import main
from vmm.devices import DeviceSpecError, VsockSpec
from vmm.memory import GuestMemory, MiB
from vmm.testing.mockvsock import OP_REQUEST, OP_RST, VsockDriver
from vmm.virtio.pci_legacy import VirtioPciLegacy
from vmm.virtio.vsock import VsockDevice


def test_spec_defaults_and_options(tmp_path):
    s = VsockSpec(f"uds={tmp_path}/v.sock")
    assert (s.cid, s.uds_path, s.transport_name) == (3, f"{tmp_path}/v.sock", "mmio")
    s = VsockSpec(f"cid=52,uds={tmp_path}/v.sock,transport=pci")
    assert (s.cid, s.transport_name) == (52, "pci")


@pytest.mark.parametrize("text,msg", [
    ("cid=3", "uds=PATH is required"),
    ("uds=/nonexistent-dir/v.sock", "does not exist"),
    ("cid=2,uds=/tmp/v.sock", "0-2 are reserved"),
    ("cid=x,uds=/tmp/v.sock", "must be a number"),
    ("uds=/tmp/v.sock,port=3", "unknown option"),
    ("uds=/tmp/v.sock,transport=isa", "unknown transport"),
])
def test_spec_errors(text, msg):
    with pytest.raises(DeviceSpecError, match=msg):
        VsockSpec(text)


def test_cli_missing_uds_directory_is_one_line(capsys, tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    assert main(["run", "--kernel", str(kernel), "--vsock", "uds=/nonexistent-dir/v.sock"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_vsock_on_legacy_pci(tmp_path):
    mem = GuestMemory(32 * MiB)
    dev = VsockDevice(str(tmp_path / "v.sock"), guest_cid=9)
    t = VirtioPciLegacy(dev, mem)
    try:
        assert int.from_bytes(t.pci.config[2:4], "little") in range(0x1000, 0x1040)
        assert int.from_bytes(t.pci.config[0x2e:0x30], "little") == 19   # subsystem
        d = VsockDriver(t, mem, arena_size=16 << 20)
        assert d.init() and d.cid == 9
        d.packet(1, 2, OP_REQUEST)                       # nobody listens on port 2
        assert [p.op for p in d.received()] == [OP_RST]
    finally:
        t.close()
        mem.close()
