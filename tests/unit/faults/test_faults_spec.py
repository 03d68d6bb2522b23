"""The fault SPEC grammar (vmm/virtio/faults.py): what parses, what it
means, and one-line errors that name the bad part."""
import pytest

from vmm.virtio.faults import DiskFaults, FaultSpecError, NetFaults, S_IOERR, T_FLUSH, T_IN, T_OUT


def test_disk_rules_parse():
    f = DiskFaults("read-error@100-199;write-error=1%;io-error@7;enospc@2048-;"
                   "flush-error=50%:times=2;delay=2ms..20ms:10%;seed=42")
    kinds = [(r.kind, r.first, r.last, r.p) for r in f.rules]
    assert kinds == [("read-error", 100, 199, 1.0), ("write-error", 0, None, 0.01),
                     ("io-error", 7, 7, 1.0), ("enospc", 2048, None, 1.0),
                     ("flush-error", 0, None, 0.5), ("delay", 0, None, 0.1)]
    assert f.seed == 42 and f.rules[4].times == 2 and f.rules[5].delay == (0.002, 0.02)


def test_disk_ranges_are_sector_overlaps():
    f = DiskFaults("read-error@100-199")
    assert f.decide(T_IN, 92, 8)[0] is None            # 92..99
    assert f.decide(T_IN, 93, 8)[0] == S_IOERR          # 93..100 touches 100
    assert f.decide(T_IN, 199, 1)[0] == S_IOERR
    assert f.decide(T_IN, 200, 8)[0] is None
    assert f.decide(T_OUT, 150, 8)[0] is None           # reads only
    assert f.counts() == {"read-error@100-199": 2}


def test_disk_kinds():
    f = DiskFaults("flush-error;enospc@1000-;write-error@5")
    assert f.decide(T_FLUSH, 0, 0)[0] == S_IOERR
    assert f.decide(T_OUT, 1000, 8)[2] == "enospc"
    assert f.decide(T_IN, 1000, 8)[0] is None
    assert f.decide(T_OUT, 0, 8)[2] == "write-error"


def test_seeded_probability_is_reproducible():
    def run(seed):
        f = DiskFaults(f"read-error=30%;seed={seed}")
        return [f.decide(T_IN, i, 8)[0] for i in range(1000)]
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert 250 < a.count(S_IOERR) < 350


def test_times_limits_a_rule():
    f = DiskFaults("write-error:times=3")
    got = [f.decide(T_OUT, 0, 1)[0] for _ in range(10)]
    assert got.count(S_IOERR) == 3 and got[:3] == [S_IOERR] * 3


def test_delay_is_added():
    f = DiskFaults("delay=5ms;delay@0-9=1ms")
    assert f.decide(T_IN, 0, 8)[1] == pytest.approx(0.006)
    assert f.decide(T_IN, 10, 8)[1] == pytest.approx(0.005)


def test_net_rules():
    f = NetFaults("rx.drop=30%;tx.dup=1%;corrupt=0.5%;delay=10ms:20%;link=down;seed=7")
    assert [(r.kind, r.direction, r.p) for r in f.rules] == [
        ("drop", "rx", 0.3), ("dup", "tx", 0.01), ("corrupt", None, 0.005),
        ("delay", None, 0.2)]
    assert not f.link_up and f.seed == 7 and not f.noop


def test_net_decisions():
    hdr = 12
    frame = bytes(12) + bytes(range(60))
    assert NetFaults("drop").decide("rx", frame, hdr) == []
    assert NetFaults("tx.drop").decide("rx", frame, hdr) == [(0.0, frame)]
    assert NetFaults("dup").decide("tx", frame, hdr) == [(0.0, frame), (0.0, frame)]
    (d, bad), = NetFaults("corrupt").decide("tx", frame, hdr)
    diff = [i for i in range(len(frame)) if frame[i] != bad[i]]
    assert len(diff) == 1 and diff[0] >= hdr         # the header is never touched
    assert NetFaults("delay=7ms").decide("rx", frame, hdr) == [(0.007, frame)]


@pytest.mark.parametrize("spec, part", [
    ("read-eror@1-2", "'read-eror@1-2': unknown disk rule 'read-eror'"),
    ("read-error@5-1", "sector range '5-1' is backwards"),
    ("read-error@x", "bad sector range 'x'"),
    ("write-error=150%", "probability '150%' not in 0..100%"),
    ("write-error=often", "bad argument 'often'"),
    ("delay", "delay needs a duration"),
    ("delay=5parsecs", "'delay=5parsecs': bad argument '5parsecs'"),
    ("delay=9ms..2ms", "backwards"),
    ("seed=abc", "seed must be an integer"),
    ("read-error;;flush-error", "empty rule"),
    ("flush-error:times=-1", "bad count"),
])
def test_disk_errors_name_the_part(spec, part):
    with pytest.raises(FaultSpecError) as e:
        DiskFaults(spec)
    assert part in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, part", [
    ("dropp=1%", "unknown net rule 'dropp'"),
    ("up.drop=1%", "direction must be rx. or tx."),
    ("link=sideways", "link=up or link=down"),
    ("drop=1%,dup=1%", "commas are not allowed"),
])
def test_net_errors_name_the_part(spec, part):
    with pytest.raises(FaultSpecError) as e:
        NetFaults(spec)
    assert part in str(e.value)
