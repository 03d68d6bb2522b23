"""Snapshots of a tiny ring-0 guest (milliseconds, no Linux): a guest that
prints the alphabet in a loop continues where it was after a restore in a
new process, twice at once from one snapshot; a Diff snapshot over its base
continues from the later point, and so does a second Diff layered on the
first (rebased); --trace-exits goes on into the same file after a restore; taking a snapshot of a running VM and
restoring with a wrong memory file are refused."""
import io
import json
import subprocess
import sys
import threading

import pytest

import vmm.testing.tinyguest as T
from vmm import snapshot
from vmm.machine import Machine, MachineConfig, STATUS

pytestmark = pytest.mark.usefixtures("needs_kvm")

# mov dx,0x3f8; mov bl,'a'; L: mov al,bl; out dx,al; inc bl; cmp bl,'{'; jne +2;
# mov bl,'a'; mov ecx,0x4000; D: dec ecx; jnz D; jmp L
ALPHABET = bytes.fromhex("66baf803" "b361" "88d8" "ee" "fec3" "80fb7b" "7502" "b361"
                         "b900400000" "ffc9" "75fc" "ebe9")


def shoot(tmp_path, steps, *run_args):
    """The console output of a snapshooter run.  Tests that compare it with
    a restore put a `pause` before the last snap: a VM resumed after its
    snapshot prints more letters before `stop` ends it (how many depends on
    the host's scheduling)."""
    k = T.make_elf(ALPHABET, str(tmp_path / "alpha.elf"))
    cmd = [sys.executable, "-m", "vmm.testing.snapshooter", "--step-timeout", "120"]
    for s in steps:
        cmd += ["--step", s]
    p = subprocess.run(cmd + ["--", "--kernel", k, "--mem", "32M", *run_args],
                       capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def following(out, n=3):
    """The n letters the alphabet guest prints after the end of `out`."""
    c = out[-1] - ord("a")
    return bytes(ord("a") + (c + 1 + i) % 26 for i in range(n))


def restore(state, mem, *extra, seconds=2):
    return subprocess.Popen([sys.executable, "-m", "vmm", "restore", "--snapshot", str(state),
                             "--mem", str(mem), "--resume", "--timeout", str(seconds), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def test_continues_where_it_was_twice_at_once(tmp_path):
    s, m = tmp_path / "a.state", tmp_path / "a.mem"
    out = shoot(tmp_path, ["wait:ghij", "pause", f"snap:Full:{s}:{m}", "stop"])
    want = following(out)
    before = m.read_bytes()
    procs = [restore(s, m, seconds=4) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == STATUS["timeout"], err.decode()
        assert out.startswith(want), (want, out[:40])    # the letters after the last one seen
    assert m.read_bytes() == before                      # MAP_PRIVATE: the file is untouched


def test_diff_over_base_continues_from_the_later_point(tmp_path):
    s, m, ds, dm = (tmp_path / n for n in ("f.state", "f.mem", "d.state", "d.mem"))
    out = shoot(tmp_path, ["wait:cdef", f"snap:Full:{s}:{m}", "wait:stuv", "pause",
                           f"snap:Diff:{ds}:{dm}", "stop"], "--track-dirty-pages")
    assert dm.stat().st_blocks * 512 < m.stat().st_size
    p = restore(ds, m, "--mem-diff", str(dm), seconds=4)
    got, err = p.communicate(timeout=120)
    assert got.startswith(following(out)), (out[-10:], got[:40], err.decode())


def test_two_diff_layers_rebased_continue_from_the_last_point(tmp_path):
    """base + diff1 + diff2 (each Diff holds the pages dirtied since the
    snapshot before it): `pyvmm snapshot-rebase` merges diff1 into the
    base, and diff2 restores over that."""
    s, m = tmp_path / "f.state", tmp_path / "f.mem"
    d1s, d1m, d2s, d2m = (tmp_path / n for n in ("d1.state", "d1.mem", "d2.state", "d2.mem"))
    out = shoot(tmp_path, ["wait:cdef", f"snap:Full:{s}:{m}", "wait:jklm",
                           f"snap:Diff:{d1s}:{d1m}", "wait:stuv", "pause",
                           f"snap:Diff:{d2s}:{d2m}", "stop"],
                "--track-dirty-pages")
    merged = tmp_path / "base+d1.mem"
    p = subprocess.run([sys.executable, "-m", "vmm", "snapshot-rebase", "--base", str(m),
                        "--diff-snapshot", str(d1s), "--diff-mem", str(d1m), "--out", str(merged)],
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and b"pages of" in p.stderr, p.stderr.decode()
    p = restore(d2s, merged, "--mem-diff", str(d2m), seconds=4)
    got, err = p.communicate(timeout=120)
    assert got.startswith(following(out)), (out[-10:], got[:40], err.decode())
    # a Full state file is not a layer
    p = subprocess.run([sys.executable, "-m", "vmm", "snapshot-rebase", "--base", str(m),
                        "--diff-snapshot", str(s), "--diff-mem", str(d1m)],
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1
    assert "not a Diff snapshot" in p.stderr.decode()


def test_exit_trace_reopened_for_append_on_restore(tmp_path):
    s, m, trace = tmp_path / "t.state", tmp_path / "t.mem", tmp_path / "exits.jsonl"
    shoot(tmp_path, ["wait:fgh", f"snap:Full:{s}:{m}", "stop"], "--trace-exits", str(trace))
    before = trace.read_bytes()
    assert before.count(b"\n") > 5
    p = restore(s, m, seconds=2)
    out, err = p.communicate(timeout=120)
    assert p.returncode == STATUS["timeout"], err.decode()
    after = trace.read_bytes()
    assert after.startswith(before) and after.count(b"\n") > before.count(b"\n") + 5
    last = json.loads(after.splitlines()[-1])
    assert (last["kind"], last["addr"], last["dir"]) == ("pio", 0x3F8, "write")


def test_snapshot_of_a_running_vm_is_refused(tmp_path):
    k = T.make_elf(ALPHABET, str(tmp_path / "alpha.elf"))
    m = Machine(MachineConfig(kernel=k, mem_size=32 << 20, serial_out=io.BytesIO(), timeout=120))
    try:
        errors = []

        def attempt():
            import time
            time.sleep(0.3)
            try:
                snapshot.create(m, str(tmp_path / "s"), str(tmp_path / "m"))
            except snapshot.SnapshotError as e:
                errors.append(str(e))
            try:
                snapshot.create(m, str(tmp_path / "s"), str(tmp_path / "m"), "Diff")
            except snapshot.SnapshotError as e:
                errors.append(str(e))
            m.pause()
            try:
                snapshot.create(m, str(tmp_path / "s"), str(tmp_path / "m"), "Diff")
            except snapshot.SnapshotError as e:
                errors.append(str(e))
            m.stop("quit")
        t = threading.Thread(target=attempt)
        t.start()
        m.run()
        t.join()
    finally:
        m.close()
    assert "pause it before taking a snapshot" in errors[0]
    assert "dirty page tracking" in errors[-1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_wrong_memory_file_is_refused(tmp_path):
    s, m = tmp_path / "a.state", tmp_path / "a.mem"
    shoot(tmp_path, ["wait:bc", f"snap:Full:{s}:{m}", "stop"])
    short = tmp_path / "short.mem"
    short.write_bytes(b"\0" * 4096)
    p = restore(s, short)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and out == b""
    assert "wrong memory file" in err.decode() and err.decode().count("\n") == 1
