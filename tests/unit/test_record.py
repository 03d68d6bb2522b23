"""vmm.record: the dataclass-like records the start-up path uses."""
from __future__ import annotations

import pytest

from vmm.record import Factory, Record


class Point(Record):
    x: int
    label: str | None = None
    tags: list = Factory(list)


class Point3(Point):
    z: int = 0


def test_positional_keyword_and_defaults():
    p = Point(1)
    assert (p.x, p.label, p.tags) == (1, None, [])
    assert Point(1, "a") == Point(x=1, label="a")
    assert Point(1) != Point(2)
    assert Point(1).tags is not Point(1).tags            # a fresh default each time
    assert vars(Point(1, "a")) == {"x": 1, "label": "a", "tags": []}
    assert repr(Point(1)) == "Point(x=1, label=None, tags=[])"


def test_inherited_fields_come_first():
    p = Point3(1, z=3)
    assert [n for n, _ in Point3._fields] == ["x", "label", "tags", "z"]
    assert (p.x, p.z) == (1, 3)
    assert Point3(1) != Point(1)                          # different classes


@pytest.mark.parametrize("make", [lambda: Point(), lambda: Point(1, "a", [], 4),
                                  lambda: Point(1, x=2), lambda: Point(1, colour="red")])
def test_bad_arguments_are_type_errors(make):
    with pytest.raises(TypeError):
        make()


def test_required_after_default_is_refused():
    with pytest.raises(TypeError):
        class Bad(Record):
            a: int = 1
            b: int


def test_unhashable_like_a_mutable_dataclass():
    with pytest.raises(TypeError):
        hash(Point(1))

