"""Replay the native fuzz corpora and every kept crash input (native/fuzz/
corpus/<target>/, native/fuzz/crashes/<target>/) through the libFuzzer
harnesses, built here with the system C compiler and ASan + UBSan instead
of libFuzzer (native/fuzz/replay_main.c), so the regressions run in a plain
`make test` without clang.  Any broken invariant or sanitizer report aborts
the replay."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ = os.path.join(ROOT, "native", "fuzz")
SRC = os.path.join(ROOT, "native", "src")
WRAP = "-Wl,--wrap=pv_vq_pop,--wrap=pv_vq_push"
TARGETS = {"virtq": ["virtq.c"], "blk": ["virtq.c", "blk.c"],
           "net": ["virtq.c", "net.c", "fastnet.c", "fastpath.c", "blk.c", "fasturing.c",
                   "uring.c"],
           "fast": ["virtq.c", "blk.c", "fastpath.c", "fasturing.c", "uring.c", "fastnet.c",
                    "net.c"],
           "vsock": ["virtq.c", "vsock.c", "vsock_tx.c"], "uring": ["virtq.c", "blk.c", "uring.c"]}


def inputs(target):
    out = []
    for kind in ("corpus", "crashes"):
        d = os.path.join(FUZZ, kind, target)
        if os.path.isdir(d):
            out += sorted(os.path.join(d, f) for f in os.listdir(d) if not f.startswith("."))
    return out


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-replay")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_replay(target, build_dir):
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler (build-essential is in the Makefile's APT_PACKAGES)"
    exe = str(build_dir / target)
    cmd = [cc, "-g", "-O1", "-std=gnu11", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-I" + os.path.join(ROOT, "native", "include"),
           os.path.join(FUZZ, "replay_main.c"), os.path.join(FUZZ, f"fuzz_{target}.c")]
    cmd += [os.path.join(SRC, s) for s in TARGETS[target]]
    if target != "virtq":
        cmd.append(WRAP)
    subprocess.run(cmd + ["-o", exe], check=True, capture_output=True, text=True)
    files = inputs(target)
    assert files, f"no corpus for {target}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    r = subprocess.run([exe] + files, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"{target}: replay failed\n{r.stderr[-4000:]}"
    assert r.stderr.count("replay ") == len(files)
