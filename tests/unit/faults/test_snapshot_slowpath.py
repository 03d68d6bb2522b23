"""Snapshots of devices with the slow path on (vmm/virtio/intercept_persist.py):
limiter budgets, fault rules (hit counts, random sequence, link state) and
trace files carry over a restore through the state file and the device
options; a hook, or a disk request held by an injected delay, is refused
with one line."""
import json
import time

import pytest

from vmm import snapshot as S
from vmm.devices import spec_from_options
from vmm.testing.mockdriver import T_IN
from vmm.virtio import intercept_persist as ip
from vmm.virtio.faults import DiskFaults, NetFaults
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.ratelimit import RateLimiter, TokenBucket
from vmm.virtio.trace import BlkTracer, PcapWriter, read_pcap

SLOW = 1_000_000            # refill time (ms): the budget barely refills during a test
FAULTS = "read-error@0-0=50%;seed=3;delay@9-9=1s"


def through_file(state):
    return S.unpack_state(S.pack_state({"arch": S.ARCH, "x": state}))["x"]


def test_blk_limiter_faults_and_trace_carry_over(blk, gmem, disk, tmp_path):
    trace = tmp_path / "blk.jsonl"
    dev, t, d = blk(limiter=RateLimiter(TokenBucket(1 << 20, SLOW, 4096), TokenBucket(1000, SLOW)),
                    faults=DiskFaults(FAULTS), tracer=BlkTracer(str(trace)))
    statuses = [d.run(T_IN, 0, read_len=512)[0] for _ in range(10)]
    assert 0 < statuses.count(1) < 10                   # the 50% rule fired some of the times
    ref = DiskFaults(FAULTS)
    assert [ref.decide(T_IN, 0, 1)[0] or 0 for _ in range(10)] == statuses
    opts = ip.blk_options(dev.intercept)
    assert opts == {"bw": f"{1 << 20}:{SLOW}:0", "ops": f"1000:{SLOW}:0", "faults": FAULTS,
                    "trace": str(trace)}                # the burst is spent: 4096 bytes read
    st = through_file(t.state())
    hits = dev.intercept.faults.counts()
    want = [ref.decide(T_IN, 0, 1)[0] or 0 for _ in range(20)]     # None: performed, ok
    budget = dev.intercept.limiter.ops.budget
    t.close()
    lines = trace.read_text().splitlines()

    spec = spec_from_options(through_file({"kind": "drive", "file": disk[0],
                                           "transport": "mmio", **opts}))
    dev2 = spec.open_device()                           # as `pyvmm restore` opens it
    t2 = VirtioMmio(dev2, gmem)
    t2.restore(st)
    icpt = dev2.intercept
    assert icpt.limiter.ops.budget == pytest.approx(budget, abs=0.1) and budget < 991
    assert icpt.limiter.bandwidth.one_time_burst == 0
    assert icpt.faults.counts() == hits
    d.t, d.regs = t2, type(d.regs)(t2)
    assert [d.run(T_IN, 0, read_len=512)[0] for _ in range(20)] == want   # the same sequence
    t2.close()
    after = trace.read_text().splitlines()
    assert after[:len(lines)] == lines and len(after) == len(lines) + 20  # appended
    assert json.loads(after[-1])["sector"] == 0


def test_hook_and_delayed_request_are_refused(blk, loop):
    class Hook:
        def blk_request(self, req):
            return None
    dev, t, d = blk(hook=Hook())
    with pytest.raises(NotImplementedError, match="hook"):
        t.state()
    t.close()                                           # frees the image's lock
    dev, t, d = blk(ioloop=loop, faults=DiskFaults("delay=2s"))
    req = d.submit(T_IN, 0, read_len=512)
    d.kick()
    assert dev.intercept.delayed == 1
    with pytest.raises(NotImplementedError, match="held by an injected delay") as e:
        t.state()
    assert "\n" not in str(e.value)
    deadline = time.monotonic() + 10
    while req.head not in dict(d.queues[0].get_used()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dev.intercept.delayed == 0 and t.state()["activated"]


def test_net_link_state_and_limiters(tmp_path):
    from vmm.virtio.intercept_net import NetIntercept
    pcap = str(tmp_path / "n.pcap")
    icpt = NetIntercept(None)
    icpt.rx_limiter = RateLimiter(ops=TokenBucket(100, SLOW))
    icpt.tx_limiter = RateLimiter(TokenBucket(5000, SLOW, 10))
    icpt.faults = NetFaults("drop=50%;seed=9")
    icpt.pcap = PcapWriter(pcap)
    icpt.pcap.write(b"\x01" * 60)
    icpt.rx_limiter.consume(0, 30)
    icpt.tx_limiter.consume(1000, 1)
    icpt.faults.link_up = False                          # as PATCH link=down would
    icpt.faults.decide("rx", b"\0" * 80, 12)
    opts = ip.net_options(icpt)
    assert opts == {"rx-ops": f"100:{SLOW}:0", "tx-bw": f"5000:{SLOW}:0", "faults": "drop=50%;seed=9",
                    "pcap": pcap}
    st = through_file(ip.state(icpt))
    icpt.close()
    again = NetIntercept(None)
    again.rx_limiter = RateLimiter(ops=TokenBucket(100, SLOW))
    again.tx_limiter = RateLimiter(TokenBucket(5000, SLOW))
    again.faults = NetFaults("drop=50%;seed=9")
    again.pcap = PcapWriter(pcap, append=True)
    ip.restore(again, st)
    assert again.rx_limiter.ops.budget == pytest.approx(70, abs=0.1)
    assert again.tx_limiter.bandwidth.budget == pytest.approx(4010, abs=0.1)
    assert not again.link_up and again.faults.counts() == icpt.faults.counts()
    again.pcap.write(b"\x02" * 60)
    again.close()
    assert [f for _, f in read_pcap(pcap)] == [b"\x01" * 60, b"\x02" * 60]   # one header


def test_rng_limiter_budget_carries_over(gmem):
    from vmm.testing.mockdriver import MockDriver
    from vmm.virtio.rng import RngDevice

    def rng():
        return RngDevice(rate_limiter=RateLimiter(TokenBucket(1000, SLOW)))
    t = VirtioMmio(rng(), gmem)
    d = MockDriver(t, gmem)
    assert d.init()
    buf = d.alloc(300)
    d.queues[0].add([(buf, 300, True)])
    d.kick(0)
    assert [n for _, n in d.queues[0].get_used()] == [300]
    opts = spec_from_options(through_file(
        {"kind": "rng", "transport": "mmio",
         **ip.limiter_options(t.device.rate_limiter, "bw", "ops")})).snapshot_options()
    assert opts["bw"] == f"1000:{SLOW}:0"
    st = through_file(t.state())
    t.close()
    t2 = VirtioMmio(rng(), gmem)
    t2.restore(st)
    assert t2.device.rate_limiter.bandwidth.budget == pytest.approx(700, abs=0.1)
    t2.close()
