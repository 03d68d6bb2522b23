import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def kvm_usable():
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture
def needs_kvm():
    if not kvm_usable():
        pytest.fail("/dev/kvm is not usable; these tests need KVM")


def pytest_collection_modifyitems(config, items):
    """Long tests first, shared out so that the xdist workers of `make test`
    finish together (vmm/testing/order.py says how)."""
    from vmm.testing.order import order
    items[:] = order(items, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))[0]
