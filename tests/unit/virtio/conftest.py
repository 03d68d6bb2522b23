"""The virtio unit tests' rig fixture (mem, image and native come from
tests/unit/conftest.py)."""
import pytest

from virtio_rig import Rig


@pytest.fixture
def rig(mem, image, native):
    made = []

    def make(**kw):
        r = Rig(mem, image, native, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()
