"""The benchmark harness (bench/): failed samples and modules are reported,
never hidden or replaced by an older run's figures; the real-path driver
really moves data through the device."""
import json
import os
import time

import numpy as np
import pytest

from bench import common, report


def test_stats_counts_failed_samples():
    s = common.stats([1.0, None, 3.0])
    assert (s["median"], s["n"], s["failed"]) == (2.0, 2, 1)
    assert common.stats([None, None]) is None


def test_report_failed_module_is_a_failed_row_not_old_figures(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"modules": {
        "exits": {"status": "error", "error": "exited with status 2"}, "boot": {"status": "ok"}}}))
    (tmp_path / "exits.json").write_text(json.dumps(   # left by an earlier run
        {"mmio_exits_per_s": {"pyvmm": {"min": 1, "median": 2, "max": 3, "n": 5}}}))
    (tmp_path / "boot.json").write_text(json.dumps({"first_instruction_s": {
        "pyvmm": {"min": 0.07, "median": 0.08, "max": 0.09, "n": 4, "failed": 1},
        "qemu": {"failed": 5}}}))
    rep = report.collect(str(tmp_path))
    assert [r["module"] for r in rep["rows"]] == ["boot"]
    md = report.markdown(rep)
    assert "exits: FAILED, not measured" in md
    assert "1 of 5 samples failed" in md and "all 5 samples failed" in md


def test_child_does_not_rerun_rejected_arguments_with_defaults(tmp_path, monkeypatch):
    from bench import __main__ as bm
    status = tmp_path / "st.json"
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    bm.child("startstop", str(status), ["--no-such-option"])
    st = json.loads(status.read_text())
    assert st["status"] == "error" and "status 2" in st["error"]
    assert not os.path.exists(tmp_path / "startstop.json")


@pytest.mark.parametrize("transport,engine", [("mmio", "sync"), ("mmio", "io_uring"), ("pci", "sync")])
def test_real_path_driver_moves_the_data(tmp_path, transport, engine):
    """bench/blk.py's C driver through the I/O thread: every request done,
    and what was written is what the image holds."""
    from bench import blk, cdriver
    from vmm.memory import GuestMemory, MiB
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * MiB))
    mem = GuestMemory(64 * MiB)
    rp = blk.RealPath(str(img), mem, transport, engine, 65536, cdriver.load())
    try:
        rp.layout(4096, True)
        mem.view(rp.data, 4096 * 32)[:] = 0x77
        sectors = np.arange(64, dtype=np.uint64) * 8
        rp.run(sectors, 32, True)
        # the C fast path counts a pass's requests after pushing them (and may
        # wake the driver before the pass ends): wait for the count
        end = time.monotonic() + 5
        while rp.dev.stats["requests"] < 64 and time.monotonic() < end:
            time.sleep(0.001)
        assert rp.ring.kicks > 0 and rp.dev.stats["requests"] == 64
    finally:
        rp.close()
        mem.close()
    data = img.read_bytes()
    assert data[:64 * 4096] == b"\x77" * (64 * 4096) and data[64 * 4096:] == bytes(4 * MiB - 64 * 4096)


@pytest.mark.parametrize("direction", ["host_to_guest", "guest_to_host"])
def test_vsock_bench_moves_every_byte_through_the_device(tmp_path, direction):
    """bench/vsock.py's C driver side (native/src/benchdrv.c) and its loops:
    each asserts internally that exactly `total` bytes crossed the device."""
    from bench import vsock
    from vmm.memory import MiB
    rate, share, cpu, host_cpu = getattr(vsock, direction)(str(tmp_path), 8 * MiB)
    assert rate > 0 and 0 < share <= 1 and cpu > 0 and host_cpu > 0
    ref_rate, ref_cpu, ref_host_cpu = vsock.socketpair(8 * MiB, direction)
    assert ref_rate > 0 and ref_cpu >= 0 and ref_host_cpu >= 0


@pytest.mark.parametrize("write", [False, True])
def test_blk_limits_do_every_request(tmp_path, write):
    """bench/blk.py's plain programs (the limits): each one, QD32 included
    (io_uring, the two-thread loop), moves every request it is timed for."""
    from bench import blk, cdriver
    from vmm.memory import MiB
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * MiB))
    plain = blk.Plain(str(img), cdriver.load())
    try:
        sectors = np.arange(64, dtype=np.uint64)[::-1].copy() * 8
        cands, _ = plain.candidates(4096, sectors, 32, write)
        assert len(cands) >= 2
        for label, call in cands.items():
            plain.buf[:] = 0x5A
            if write:                   # back to zeros
                os.truncate(img, 0)
                os.truncate(img, 4 * MiB)
            r = call()
            assert r > 0, label
            if write:
                assert img.read_bytes()[:64 * 4096] == b"\x5a" * (64 * 4096), label
            else:
                assert not plain.buf[:4096].any(), label
        assert set(plain.sample(4096, sectors, 32, write)) == set(cands)
    finally:
        plain.close()


def test_blk_limit_buffers_are_page_aligned(tmp_path):
    """The plain programs copy from/to page-aligned memory, as the device
    does (guest pages): a 16-byte-aligned buffer made 64 KiB copies 15-28 %
    slower and the limit fell below the device."""
    from bench import blk, cdriver
    img = tmp_path / "d.img"
    img.write_bytes(bytes(65536))
    plain = blk.Plain(str(img), cdriver.load())
    try:
        assert plain.buf.ctypes.data % 4096 == 0
        assert plain.buf.nbytes >= max(blk.KINDS.values()) * max(blk.DEPTHS)
    finally:
        plain.close()


@pytest.mark.parametrize("mech,pin", [(m, p) for m in range(3) for p in range(3)] + [(3, 1)])
def test_wakeup_round_trips_are_timed(mech, pin):
    """bench/driver.c's hand-offs (eventfd, futex, pipe; spin on two CPUs)
    complete every round trip and return a time per round trip."""
    from bench import cdriver
    if pin == 1 and (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")
    lib = cdriver.load()[1]
    before = os.sched_getaffinity(0)
    r = lib.bd_pingpong2(200, mech, pin)
    assert os.sched_getaffinity(0) == before        # the caller's pinning is given back
    if mech == 3 and r == -110:
        pytest.skip("the spinning peer's CPU is taken (SCHED_FIFO load)")
    assert 0 < r < 1e9
    assert lib.bd_pingpong2(10, 3, 2) < 0           # two spinners on one CPU: refused


def test_blk_one_cpu_variant_pins_both_threads_and_gives_cpus_back():
    import threading
    import types
    from bench import blk
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")
    seen, go, done, leave = {}, threading.Event(), threading.Event(), threading.Event()

    def io_thread():
        go.wait(10)
        seen["io"] = os.sched_getaffinity(0)
        done.set()
        leave.wait(10)
        seen["io after"] = os.sched_getaffinity(0)
    t = threading.Thread(target=io_thread)
    t.start()
    before = os.sched_getaffinity(0)
    rp = types.SimpleNamespace(loop=types.SimpleNamespace(_thread=t))
    with blk.on_one_cpu(rp):
        seen["driver"] = os.sched_getaffinity(0)
        go.set()
        done.wait(10)
    leave.set()
    t.join()
    assert seen == {"driver": {0}, "io": {0}, "io after": before}
    assert os.sched_getaffinity(0) == before


def test_blk_flags_a_device_above_its_limit():
    from bench import blk
    lim = {"min": 95.0, "median": 100.0, "max": 105.0, "n": 5, "how": "x"}
    res = {"device": {"seq64k write QD32": {"mmio sync": {"min": 106.0, "median": 110.0, "n": 5},
                                            "pci sync": {"min": 80.0, "median": 90.0, "n": 5},
                                            "pci-modern sync": {"min": 98.0, "median": 102.0,
                                                                "n": 5}}},
           "limit_by_path": {"seq64k write QD32": {p: lim for p in
                                                   ("mmio sync", "pci sync", "pci-modern sync")}}}
    assert [(a["path"], a["every_sample_above"]) for a in blk.above_limit(res)] == [
        ("mmio sync", True), ("pci-modern sync", False)]
    res["device"]["seq64k write QD32"]["mmio sync"]["n"] = 1     # one sample proves nothing
    assert not blk.above_limit(res)[0]["every_sample_above"]


def test_blk_qd1_bound_uses_the_fastest_sleeping_hand_off():
    from bench import blk

    class Lib:
        def bd_pingpong2(self, n, mech, pin):      # ns per round trip
            return {0: 30000, 1: 20000, 2: 25000, 3: 100}[mech] // (4 if pin == 2 else 1)
    res = {"limit": {"rand4k read QD1": {"median": 1e6}, "rand4k read QD32": {"median": 1e6}}}
    blk.wakeup(res, Lib(), 3)
    b = res["qd1_bound"]["rand4k read QD1"]
    assert b["how"] == "futex, on one CPU"           # spinning never counts: it never sleeps
    assert b["req_s"] == pytest.approx(1 / (5e-6 + 1e-6))
    assert list(res["qd1_bound"]) == ["rand4k read QD1"]
    assert res["wakeup"]["round_trip_s"]["median"] == pytest.approx(30e-6)


def test_inguest_pools_each_read_and_ping_but_the_first():
    """bench/inguest.py: 1 MiB reads and pings are pooled per read / reply
    (the first reply, which waits for ARP, left out), interrupts per op."""
    from bench import inguest
    text = (b"iobench: disk read bs=1048576 count=2 bytes=2097152 us=300000 "
            b"each_us=100000,200000\r\n"
            b"iobench: disk read bs=4096 count=256 bytes=1048576 us=2000000\r\n"
            b"iobench: irqs before-ping\r\n  5:    100   IO-APIC   5-edge   virtio0\r\n"
            b"LOC:   1000   Local timer interrupts\r\niobench: irqs end\r\n"
            b"64 bytes from 10.77.0.1: seq=0 ttl=64 time=40.5 ms\r\n"
            b"64 bytes from 10.77.0.1: seq=1 ttl=64 time=19.5 ms\r\n"
            b"64 bytes from 10.77.0.1: seq=2 ttl=64 time=20.5 ms\r\n"
            b"round-trip min/avg/max = 19.5/26.8/40.5 ms\r\n"
            b"iobench: irqs after-ping\r\n  5:    163   IO-APIC   5-edge   virtio0\r\n"
            b"LOC:   1420   Local timer interrupts\r\niobench: irqs end\r\n")
    got = inguest.parse(text)
    assert got["disk read 1m"] == pytest.approx([10.48576, 5.24288])
    assert got["disk read 4k"] == pytest.approx(128)
    assert got["ping rtt"] == [19.5, 20.5]
    assert inguest.irqs_per_op(text) == {"ping": {"virtio": 3.0, "timer": 20.0}}


@pytest.mark.parametrize("obeys", [True, False])
def test_a_stopped_module_cleans_up_or_is_killed(tmp_path, obeys):
    """A module over its time limit gets SIGTERM first, so its `finally`
    (a network namespace, a scratch image) runs; one that ignores it is
    SIGKILLed after the grace period."""
    import subprocess
    import sys
    from bench import __main__ as bm
    mark = tmp_path / "cleaned"
    handler = "lambda *_: sys.exit(143)" if obeys else "signal.SIG_IGN"
    code = (f"import signal, sys, time\nsignal.signal(signal.SIGTERM, {handler})\n"
            f"try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
            f"finally:\n    open({str(mark)!r}, 'w').close()\n")
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    bm.stop_group(p, grace=1)
    assert p.returncode == (143 if obeys else -9)
    assert mark.exists() == obeys
