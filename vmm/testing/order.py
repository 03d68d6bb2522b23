"""The order of the test run (tests/conftest.py): long tests first, shared
out so that every pytest-xdist worker finishes at about the same time.

Under `make test` (-n 2 --dist worksteal) each worker starts with one
consecutive chunk of the collection (xdist/scheduler/worksteal.py,
check_schedule: len(pending) // workers_left each, in order), runs it from
the front, and a worker that runs dry steals the back half of the busiest
one's remaining chunk.  So: the long tests are dealt out longest first to
the least-loaded chunk (LPT), each chunk starts with its long tests, and the
many short unit tests fill the chunks' backs, which is what gets stolen.

The session snapshot of the default guest (tests/integration/conftest.py,
fixture `guest_snapshot`) is one cold boot paid by the first test that
needs it: it is charged to chunk 0, whose worker starts with the tests that
restore from it; the other workers start with their cold boots and reach
their restores once the snapshot is ready instead of waiting on its lock.

Costs are rough seconds on a loaded 2-core host, for the order only (never
asserted): `@pytest.mark.slow(seconds)` on a test that cold-boots the
default guest or does long guest work, RESTORE for a test restoring from the
snapshot, INTEGRATION for other guest tests (tiny guests), 0 otherwise.
"""
SNAPSHOT_FIXTURE = "guest_snapshot"
SNAPSHOT, RESTORE, INTEGRATION = 60.0, 8.0, 2.0


def cost(item):
    m = item.get_closest_marker("slow")
    if m is not None:
        return float(m.args[0])
    if SNAPSHOT_FIXTURE in item.fixturenames:
        return RESTORE
    return INTEGRATION if item.get_closest_marker("integration") is not None else 0.0


def chunk_sizes(n_items, n_workers):
    """The initial share of each worker under worksteal: consecutive chunks,
    len(pending) // workers_left each."""
    sizes, left = [], n_items
    for i in range(n_workers):
        sizes.append(left // (n_workers - i))
        left -= sizes[-1]
    return sizes


def order(items, n_workers):
    """`items` (pytest items) in run order for `n_workers` worksteal workers
    (1: no xdist); returns (new list, estimated cost of each chunk)."""
    n = max(1, n_workers)
    costs = {id(it): cost(it) for it in items}
    heavy = sorted((it for it in items if costs[id(it)] > 0), key=lambda it: -costs[id(it)])
    light = [it for it in items if costs[id(it)] == 0]
    sizes = chunk_sizes(len(items), n)
    load, chunks = [0.0] * n, [[] for _ in range(n)]
    if any(SNAPSHOT_FIXTURE in it.fixturenames for it in heavy):
        load[0] += SNAPSHOT
    for it in heavy:
        # the least loaded chunk with room left (the sizes are xdist's)
        i = min((i for i in range(n) if len(chunks[i]) < sizes[i]), key=lambda i: load[i])
        chunks[i].append(it)
        load[i] += costs[id(it)]
    for i, chunk in enumerate(chunks):
        # stable: longest first within each group; chunk 0 restores first
        # (its worker boots the snapshot), the others restore last
        chunk.sort(key=lambda it: (SNAPSHOT_FIXTURE in it.fixturenames) == (i != 0))
        take = sizes[i] - len(chunk)
        chunk += light[:take]
        del light[:take]
    return [it for chunk in chunks for it in chunk], load
