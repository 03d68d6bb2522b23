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
