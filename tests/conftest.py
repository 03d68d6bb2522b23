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
    """Guest tests first (a stable sort: otherwise in collection order).
    Under pytest-xdist (make test) the long default-guest boots then start
    at once on every worker, and the many short unit/native/fuzz tests fill
    the workers at the end instead of leaving one boot running alone."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)
