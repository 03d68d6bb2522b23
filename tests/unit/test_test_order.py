"""The test run's order (vmm/testing/order.py) against pytest-xdist's own
worksteal scheduler: each worker's first share is the chunk we planned, long
tests lead every chunk, and the snapshot's restores lead chunk 0 only."""
import pytest

from vmm.testing import order as O

ws = pytest.importorskip("xdist.scheduler.worksteal")


class Item:
    def __init__(self, name, slow=None, snapshot=False, integration=False):
        self.name = name
        self.fixturenames = ["tmp_path"] + (["restored", O.SNAPSHOT_FIXTURE] if snapshot else [])
        self.marks = {}
        if slow is not None:
            self.marks["slow"] = pytest.mark.slow(slow).mark
        if integration or slow is not None or snapshot:
            self.marks["integration"] = pytest.mark.integration.mark

    def get_closest_marker(self, name):
        return self.marks.get(name)

    def __repr__(self):
        return self.name


class Node:
    shutting_down = False

    def __init__(self, i):
        self.sent = []
        self.gateway = type("Gateway", (), {"id": f"gw{i}"})()

    def send_runtest_some(self, indices):
        self.sent += indices

    def shutdown(self):             # an idle worker with nothing left to steal
        self.shutting_down = True


class Config:
    def __init__(self, n):
        self.n = n

    def getvalue(self, name):
        assert name == "tx"
        return [f"{self.n}*popen"]


def first_shares(n_items, n_workers):
    """What xdist's worksteal scheduler sends each worker at the start."""
    sched = ws.WorkStealingScheduling(Config(n_workers))
    nodes = [Node(i) for i in range(n_workers)]
    names = [f"t{i}" for i in range(n_items)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, names)
    sched.schedule()
    return [node.sent for node in nodes]


@pytest.mark.parametrize("n_items,n_workers", [(937, 2), (938, 2), (10, 3), (5, 4), (1, 2)])
def test_chunk_sizes_are_the_worksteal_first_shares(n_items, n_workers):
    shares = first_shares(n_items, n_workers)
    sizes = O.chunk_sizes(n_items, n_workers)
    assert [len(s) for s in shares] == sizes
    starts = [sum(sizes[:i]) for i in range(n_workers)]
    assert shares == [list(range(a, a + k)) for a, k in zip(starts, sizes)]


def suite():
    items = [Item(f"unit{i}") for i in range(40)]
    items += [Item("boot-a", slow=60), Item("boot-b", slow=45), Item("boot-c", slow=45),
              Item("boot-d", slow=40), Item("tiny", integration=True)]
    items += [Item(f"restore{i}", snapshot=True) for i in range(6)]
    items += [Item("vsock", slow=50, snapshot=True)]
    return items


def test_long_tests_lead_each_chunk_and_restores_lead_chunk_0_only():
    items = suite()
    ordered, load = O.order(items, 2)
    assert sorted(map(id, ordered)) == sorted(map(id, items))      # each test once
    sizes = O.chunk_sizes(len(items), 2)
    chunks = [ordered[:sizes[0]], ordered[sizes[0]:]]
    for i, chunk in enumerate(chunks):
        costs = [O.cost(it) for it in chunk]
        n_heavy = sum(c > 0 for c in costs)
        assert all(c > 0 for c in costs[:n_heavy]) and not any(costs[n_heavy:]), chunk
        snap = [O.SNAPSHOT_FIXTURE in it.fixturenames for it in chunk[:n_heavy]]
        if i == 0:                  # restores first: this worker boots the snapshot
            assert snap == sorted(snap, reverse=True) and snap[0], chunk
        else:                       # cold boots first, restores when the snapshot is ready
            assert snap == sorted(snap), chunk
            assert not snap[0], chunk
    # LPT: the chunks' estimated loads differ by less than the longest test
    assert abs(load[0] - load[1]) < max(O.cost(it) for it in items)
    assert sum(load) == O.SNAPSHOT + sum(O.cost(it) for it in items)


def test_one_worker_puts_every_long_test_first():
    ordered, _ = O.order(suite(), 1)
    costs = [O.cost(it) for it in ordered]
    n_heavy = sum(c > 0 for c in costs)
    assert not any(costs[n_heavy:]) and all(costs[:n_heavy])
    assert costs[0] == max(costs) or O.SNAPSHOT_FIXTURE in ordered[0].fixturenames


def test_more_long_tests_than_room_in_a_chunk():
    items = [Item(f"boot{i}", slow=10 + i) for i in range(5)]
    ordered, load = O.order(items, 2)
    assert sorted(map(id, ordered)) == sorted(map(id, items))
    assert [len(c) for c in (ordered[:2], ordered[2:])] == O.chunk_sizes(5, 2)
