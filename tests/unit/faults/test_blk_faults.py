"""Disk faults, traces and hooks through the mock driver (virtio-blk slow
path, vmm/virtio/intercept.py): exact sectors, seeded counts, a failed write
never reaches the image, delays complete later, and with everything removed
the C fast path is back."""
import json
import time

from vmm.testing.mockdriver import T_FLUSH, T_IN, T_OUT
from vmm.testing.waiting import SLOW
from vmm.virtio.faults import DiskFaults
from vmm.virtio.trace import BlkTracer

S_OK, S_IOERR = 0, 1


def read(d, sector, n=4096):
    status, data, used = d.run(T_IN, sector=sector, read_len=n)
    return status, data


def test_read_error_at_exactly_the_range(blk, disk):
    dev, t, d = blk(faults=DiskFaults("read-error@100-107"))
    assert read(d, 92)[0] == S_OK                      # 92..99
    assert read(d, 100)[0] == S_IOERR
    assert read(d, 104, 512)[0] == S_IOERR
    assert read(d, 108)[0] == S_OK
    status, data = read(d, 200)
    assert status == S_OK and data == disk[1][200 * 512:200 * 512 + 4096]
    assert d.run(T_OUT, sector=100, data=b"x" * 512)[0] == S_OK   # reads only
    assert dev.stats["ioerr"] == 2 and dev.faults_counts() == {"read-error@100-107": 2}
    assert d.check_guards() == []


def test_failed_write_never_modifies_the_image(blk, disk):
    dev, t, d = blk(faults=DiskFaults("write-error@0-15;enospc@64-"))
    for sector in (0, 8, 64, 1000):
        status, _, used = d.run(T_OUT, sector=sector, data=b"\xee" * 4096)
        assert status == S_IOERR and used == 1
    assert d.run(T_OUT, sector=16, data=b"\xee" * 512)[0] == S_OK
    dev.close()
    with open(disk[0], "rb") as f:
        now = f.read()
    assert now[:16 * 512] == disk[1][:16 * 512]
    assert now[16 * 512:17 * 512] == b"\xee" * 512
    assert now[17 * 512:] == disk[1][17 * 512:]


def test_seeded_probability_exact_count(blk):
    spec = "read-error=25%;seed=1234"
    ref = DiskFaults(spec)
    expected = [ref.decide(T_IN, 0, 1)[0] for _ in range(200)]
    dev, t, d = blk(faults=DiskFaults(spec))
    got = [read(d, 0, 512)[0] for _ in range(200)]
    assert got == [s if s is not None else S_OK for s in expected]
    assert got.count(S_IOERR) == dev.stats["ioerr"] == expected.count(S_IOERR) > 0


def test_flush_error(blk):
    dev, t, d = blk(faults=DiskFaults("flush-error:times=1"))
    assert d.run(T_FLUSH)[0] == S_IOERR
    assert d.run(T_FLUSH)[0] == S_OK


def test_delay_completes_later_and_in_the_end(blk, loop, disk):
    dev, t, d = blk(ioloop=loop, faults=DiskFaults("delay=200ms"))
    t0 = time.monotonic()
    r = d.submit(T_IN, sector=8, read_len=4096)
    d.kick(0)
    u = d.queues[0].get_used()
    if time.monotonic() - t0 < 0.19:       # (a descheduled test thread may look too late)
        assert u == []                                # not yet
    while not u and time.monotonic() - t0 < SLOW:
        time.sleep(0.002)
        u = d.queues[0].get_used()
    assert time.monotonic() - t0 >= 0.19
    assert u[0][0] == r.head and d.result(r) == (S_OK, disk[1][4096:8192])


def test_change_while_running_and_back_to_fast_path(blk):
    dev, t, d = blk()
    assert dev.intercept is None and read(d, 0)[0] == S_OK
    dev.configure(faults=DiskFaults("read-error@0"))
    assert read(d, 0)[0] == S_IOERR
    dev.configure(faults=DiskFaults("read-error@8"))
    assert read(d, 0)[0] == S_OK and read(d, 8)[0] == S_IOERR
    dev.configure(faults=None)
    assert dev.intercept is None and read(d, 8)[0] == S_OK


def test_noop_spec_changes_nothing(blk, disk):
    dev, t, d = blk(faults=DiskFaults(""))
    assert read(d, 16) == (S_OK, disk[1][16 * 512:16 * 512 + 4096])


def test_trace_one_json_line_per_request(blk, tmp_path):
    path = tmp_path / "trace.jsonl"
    dev, t, d = blk(tracer=BlkTracer(path), faults=DiskFaults("read-error@50"))
    read(d, 8)
    read(d, 50, 512)
    d.run(T_OUT, sector=3, data=b"a" * 1024)
    d.run(T_FLUSH)
    dev.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["type"], x["sector"], x["bytes"], x["status"]) for x in lines] == [
        ("read", 8, 4096, "ok"), ("read", 50, 512, "ioerr"), ("write", 3, 1024, "ok"),
        ("flush", 0, 0, "ok")]
    assert lines[1]["fault"] == "read-error" and all(x["queue"] == 0 for x in lines)
    assert all(x["latency_us"] >= 0 and x["t"] > 1e9 for x in lines)


class Recorder:
    def __init__(self):
        self.seen, self.done = [], []

    def blk_request(self, req):
        self.seen.append((req.kind, req.sector, req.nbytes, req.data))
        return "ioerr" if req.sector == 77 else None

    def blk_done(self, req, status):
        self.done.append((req.sector, status))


def test_hook_sees_and_decides(blk, disk):
    h = Recorder()
    dev, t, d = blk(hook=h)
    read(d, 1, 512)
    d.run(T_OUT, sector=2, data=b"q" * 512)
    assert d.run(T_OUT, sector=77, data=b"z" * 512)[0] == S_IOERR
    assert h.seen == [("read", 1, 512, None), ("write", 2, 512, b"q" * 512),
                      ("write", 77, 512, b"z" * 512)]
    assert h.done == [(1, 0), (2, 0), (77, 1)]
    dev.close()
    with open(disk[0], "rb") as f:
        assert f.read()[77 * 512:78 * 512] == disk[1][77 * 512:78 * 512]
