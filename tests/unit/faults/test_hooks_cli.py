"""Hooks loaded from a file (examples/hooks.py) and the CLI's slow-path
options: parsed up front, one-line errors naming the bad part."""
import os
import struct

import pytest

from vmm.devices import DeviceSpecError, DriveSpec, NetSpec, RngSpec
from vmm.virtio.hooks import HookError, load_hook
from vmm.virtio.intercept import BlkRequest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "hooks.py")


def test_example_flaky_disk():
    h = load_hook(f"{EXAMPLE}:FlakyDisk")
    got = [h.blk_request(BlkRequest(1, 8, 512, b"x" * 512)) for _ in range(200)]
    assert got.count("ioerr") == 2 and got[99] == "ioerr"
    assert h.blk_request(BlkRequest(4, 0, 0, None)) == 0.010
    assert h.blk_request(BlkRequest(1, 4096, 512, b"x" * 512)) is None


def test_example_packet_log_drops_odd_echo_requests(capsys):
    h = load_hook(f"{EXAMPLE}:PacketLog")

    def echo(seq):
        ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
        return bytes(12) + b"\x08\x00" + ip + struct.pack("!BBHHH", 8, 0, 0, 1, seq)
    assert h.net_frame("rx", echo(1)) == "drop"
    assert h.net_frame("rx", echo(2)) is None
    assert "10.0.0.1 -> 10.0.0.2 proto 1" in capsys.readouterr().err


def test_load_errors(tmp_path):
    with pytest.raises(HookError, match="expected SOURCE:NAME"):
        load_hook("nocolon")
    with pytest.raises(HookError, match="no such file"):
        load_hook(f"{tmp_path}/missing.py:X")
    bad = tmp_path / "bad.py"
    bad.write_text("class Nothing: pass\nraise_me = 1\n")
    with pytest.raises(HookError, match="has no 'Y'"):
        load_hook(f"{bad}:Y")
    with pytest.raises(HookError, match="defines none of"):
        load_hook(f"{bad}:Nothing")
    bad.write_text("1/0\n")
    with pytest.raises(HookError, match="ZeroDivisionError"):
        load_hook(f"{bad}:X")


def test_cli_options(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    d = DriveSpec(f"file={img},faults=read-error@8-15;seed=2,bw=10M:1000,ops=100:100,"
                  f"trace={tmp_path}/t.jsonl,hook={EXAMPLE}:FlakyDisk")
    assert set(d.slow) == {"faults", "limiter", "trace", "hook"}
    assert d.slow["limiter"].bandwidth.rate == 10 << 20
    n = NetSpec(f"tap=t0,faults=rx.drop=1%;link=down,pcap={tmp_path}/c.pcap,rx-bw=1M:100,"
                f"tx-ops=10:10")
    assert set(n.slow) == {"faults", "pcap", "rx_limiter", "tx_limiter"}
    assert DriveSpec(f"file={img}").slow == {} and NetSpec("tap=t0").slow == {}
    r = RngSpec("ops=10:1000,transport=pci")
    assert r.rate_limiter.ops.size == 10 and r.transport_name == "pci"
    assert RngSpec("").rate_limiter is None


@pytest.mark.parametrize("cls, text, msg", [
    (DriveSpec, "faults=read-eror@1", "--drive: faults: 'read-eror@1': unknown disk rule"),
    (DriveSpec, "bw=10M", "--drive: bw: expected SIZE:REFILL_MS[:BURST], got '10M'"),
    (DriveSpec, "ops=1:0", "--drive: ops: size and refill_time must be positive"),
    (NetSpec, "faults=drop=30%;dupp=1", "--net: faults: 'dupp=1': unknown net rule 'dupp'"),
    (NetSpec, "hook=nofile.py:X", "--net: hook: nofile.py: no such file"),
    (NetSpec, "rx-ops=a:b", "--net: rx-ops: bad number 'a'"),
    (RngSpec, "bw=1x:100", "--rng: bw: bad number '1x'"),
])
def test_cli_errors_are_one_line(tmp_path, cls, text, msg):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(512))
    prefix = {DriveSpec: f"file={img},", NetSpec: "tap=t0,", RngSpec: ""}[cls]
    with pytest.raises(DeviceSpecError) as e:
        cls(prefix + text)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_run_flags_describe_entropy_in_vm_config():
    from vmm.machine import MachineConfig
    from vmm.vmconfig import VmConfig
    cfg = VmConfig.from_machine_config(MachineConfig(kernel="k", devices=[RngSpec("ops=10:100")]))
    assert cfg.to_dict()["entropy"] == {
        "rate_limiter": {"ops": {"size": 10, "one_time_burst": 0, "refill_time": 100}}}
    assert VmConfig.from_machine_config(MachineConfig(kernel="k")).to_dict().get("entropy") is None
