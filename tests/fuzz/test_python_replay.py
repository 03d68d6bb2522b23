"""Replay the Python fuzz targets' corpora and every kept crash input
(fuzz/corpus/<target>/, fuzz/crashes/<target>/) through the targets
themselves, without atheris: each must run clean (no exception, no error
logged by the VMM, no broken invariant)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ = os.path.join(ROOT, "fuzz")
sys.path.insert(0, os.path.join(FUZZ, "targets"))

TARGETS = sorted(f[:-3] for f in os.listdir(os.path.join(FUZZ, "targets"))
                 if f.endswith(".py") and not f.endswith("lib.py"))


def cases():
    out = []
    for t in TARGETS:
        for kind in ("corpus", "crashes"):
            d = os.path.join(FUZZ, kind, t)
            if os.path.isdir(d):
                out += [pytest.param(t, os.path.join(d, f), id=f"{t}/{kind}/{f}")
                        for f in sorted(os.listdir(d)) if not f.startswith(".")]
    return out


def test_every_target_has_a_corpus():
    for t in TARGETS:
        d = os.path.join(FUZZ, "corpus", t)
        assert os.path.isdir(d) and os.listdir(d), f"{t}: no seed corpus"


@pytest.mark.parametrize("target,path", cases())
def test_replay(target, path):
    import importlib
    import fuzzlib
    mod = importlib.import_module(target)
    with open(path, "rb") as f:
        data = f.read()
    # Under pytest-xdist another test of this worker may have logged an error
    # on purpose (tests/integration/test_io_threads.py's stuck I/O thread).
    fuzzlib.forget_errors()
    mod.one_input(data)
