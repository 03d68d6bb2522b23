"""Run the fuzz targets for a time budget and fail on any finding (make fuzz).

    python fuzz/run.py --seconds 60            # every target 60 s
    python fuzz/run.py --total 120             # two minutes in all (.ci/run)
    python fuzz/run.py --only virtq,mmio_blk --seconds 600

Native targets are the libFuzzer binaries `make fuzz-build` puts in
build/fuzz/ (harnesses in native/fuzz/); Python targets are the modules in
fuzz/targets/ run under atheris (fuzz/atheris_main.py).  Each target starts
from its seed corpus in the repository plus the kept crash inputs, and
grows a working corpus in build/fuzz/corpus/<target>.  A crash, a sanitizer
report, a leak or a hang (per-input timeout) makes libFuzzer exit non-zero
and write the input to build/fuzz/artifacts/; this script then exits 1.
Keep such an input in native/fuzz/crashes/<target>/ or fuzz/crashes/<target>/
once fixed: tests/fuzz/ replays those in `make test`.

Executions and coverage (libFuzzer's cov/ft) per target are printed and
saved to build/fuzz/stats.json.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "build", "fuzz")
NATIVE = ("virtq", "blk", "fast", "net", "vsock", "uring")
PER_INPUT_TIMEOUT = 10          # seconds: a longer input is a hang
STARTUP = 2                     # seconds a target takes to start and load its corpus


def python_targets():
    d = os.path.join(HERE, "targets")
    return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.endswith("lib.py"))


def target_cmd(name, seconds, work):
    if name in NATIVE:
        seeds = os.path.join(ROOT, "native", "fuzz")
        cmd = [os.path.join(BUILD, name), "-max_len=16384"]
    else:
        seeds = HERE
        cmd = [sys.executable, os.path.join(HERE, "atheris_main.py"), name, "-max_len=4096"]
    cmd += [f"-max_total_time={seconds}", f"-timeout={PER_INPUT_TIMEOUT}", "-rss_limit_mb=2560",
            "-print_final_stats=1", f"-artifact_prefix={os.path.join(BUILD, 'artifacts', name)}-",
            work]
    for kind in ("corpus", "crashes"):
        d = os.path.join(seeds, kind, name)
        if os.path.isdir(d) and os.listdir(d):
            cmd.append(d)
    return cmd


def parse(log):
    stats = {}
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    if m:
        stats["execs"] = int(m.group(1))
    m = re.search(r"stat::average_exec_per_sec:\s*(\d+)", log)
    if m:
        stats["exec_per_sec"] = int(m.group(1))
    last = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if last:
        stats["cov"], stats["ft"], stats["corpus"] = map(int, last[-1])
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="budget per target")
    ap.add_argument("--total", type=int, help="wall-clock budget for all targets together, shared as it goes")
    ap.add_argument("--only", help="comma-separated target names")
    ap.add_argument("--list", action="store_true", help="print the targets and exit")
    args = ap.parse_args(argv)
    targets = list(NATIVE) + python_targets()
    if args.only:
        wanted = args.only.split(",")
        unknown = [t for t in wanted if t not in targets]
        if unknown:
            ap.error(f"unknown targets {unknown}; known: {targets}")
        targets = wanted
    if args.list:
        print("\n".join(targets))
        return 0
    start = time.monotonic()
    os.makedirs(os.path.join(BUILD, "artifacts"), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    # leaks are findings too (on by default; explicit so an inherited setting cannot drop it)
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":detect_leaks=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    results, failed = {}, []
    for i, name in enumerate(targets):
        seconds = args.seconds
        if args.total:      # the wall-clock budget left, shared by the targets left
            left = args.total - (time.monotonic() - start)
            seconds = max(1, int(left / (len(targets) - i)) - STARTUP)
        work = os.path.join(BUILD, "corpus", name)
        os.makedirs(work, exist_ok=True)
        cmd = target_cmd(name, seconds, work)
        if name in NATIVE and not os.access(cmd[0], os.X_OK):
            print(f"fuzz: {cmd[0]} missing: run `make fuzz-build`", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", env=env, cwd=ROOT)
        stats = parse(r.stdout)
        stats.update(seconds=round(time.monotonic() - t0, 1), rc=r.returncode)
        results[name] = stats
        logf = os.path.join(BUILD, f"{name}.log")
        with open(logf, "w") as f:
            f.write(r.stdout)
        ok = r.returncode == 0
        print(f"{name:18} {'ok ' if ok else 'FAIL'} execs={stats.get('execs', '?'):>9} "
              f"cov={stats.get('cov', '?'):>5} ft={stats.get('ft', '?'):>6} "
              f"({stats['seconds']} s)", flush=True)
        if not ok:
            failed.append(name)
            tail = [ln for ln in r.stdout.splitlines() if not ln.startswith('"')][-40:]
            print("\n".join(tail), file=sys.stderr)
            print(f"fuzz: {name} failed (log {logf}, input in {BUILD}/artifacts/)", file=sys.stderr)
    with open(os.path.join(BUILD, "stats.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
