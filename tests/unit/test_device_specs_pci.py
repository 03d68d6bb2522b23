"""--drive/--net transport names and queues=N (vmm/devices.py)."""
import pytest

from vmm.devices import DeviceSpecError, DriveSpec, NetSpec


@pytest.mark.parametrize("name", ["mmio", "pci", "pci-legacy", "pci-transitional"])
def test_transport_names(tmp_path, name):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    assert DriveSpec(f"file={img},transport={name}").transport_name == name
    assert NetSpec(f"tap=t0,transport={name}").transport_name == name


def test_queues(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    assert DriveSpec(f"file={img}").queues == 1
    assert DriveSpec(f"file={img},queues=4").queues == 4
    assert NetSpec("tap=t0,queues=8,transport=pci").queues == 8
    for bad in ("0", "9", "x", "", "-1"):
        with pytest.raises(DeviceSpecError, match="queues"):
            DriveSpec(f"file={img},queues={bad}")
        with pytest.raises(DeviceSpecError, match="queues"):
            NetSpec(f"tap=t0,queues={bad}")
    with pytest.raises(DeviceSpecError, match="unknown transport"):
        DriveSpec(f"file={img},transport=pci-modern")
