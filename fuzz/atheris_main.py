"""Run one Python fuzz target under atheris (libFuzzer's engine, coverage
from instrumented Python bytecode):

    python fuzz/atheris_main.py mmio_blk [libFuzzer flags] CORPUS_DIR...

fuzz/run.py calls this for every module in fuzz/targets/.  Why atheris: it
is Google's maintained coverage-guided fuzzer for CPython (binary wheels for
3.11 on x86-64), it uses libFuzzer itself, so the Python and C targets share
one engine, one corpus format and the same -max_total_time / -timeout /
crash-artifact conventions, and it instruments the pure-Python device code
(vmm/) that the C harnesses cannot reach.
"""
import importlib
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "targets"))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    name = sys.argv[1]
    with atheris.instrument_imports(include=["vmm", "fuzzlib", "apilib", name]):
        target = importlib.import_module(name)
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
