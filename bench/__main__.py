"""Run every benchmark, then write the report (bench/report.py):

    python -m bench [--quick] [--only NAME[,NAME...]] [--budget MINUTES]

Modules, in order: boot, startup, exits, pio, blk, net, starve, api, vsock,
faults, snapshot, memory, startstop, inguest, guest (those booting Linux guests last).  Each
runs in a child process (`python -m bench --child ...`, which imports the
module and calls its main(argv)) with a time limit, so a missing, failing or
hanging module is recorded in bench/results/run.json and the report, and the
run goes on.  The whole run stops starting modules when --budget is used up
(default 60 minutes; a full run takes about 20 minutes on an idle 2-core
software-KVM host, much longer when the machine is shared).
A full run first removes every result file of an earlier run; --only keeps
the other modules' files and status.

QEMU (`qemu-system-x86_64`, Debian package qemu-system-x86) is the
side-by-side reference; if it is absent it is installed with apt-get when
running as root, otherwise the command to install it is printed and the
figures are pyvmm-only.
"""
import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from bench import common

# name: (full argv, quick argv, time limit in seconds)
MODULES = {
    "boot": (["--reps", "5", "--init-reps", "3"], ["--reps", "3", "--init-reps", "1"], 900),
    "startup": (["--reps", "7"], ["--reps", "3"], 240),
    "exits": (["--reps", "5"], ["--reps", "3", "--count", "30000"], 180),
    "pio": (["--reps", "5"], ["--reps", "3"], 300),
    "blk": (["--reps", "5"], ["--reps", "3", "--size-mib", "64", "--requests", "4096"], 600),
    "net": (["--reps", "5"], ["--reps", "3"], 400),
    "starve": (["--pings", "200"], ["--pings", "60"], 300),
    "api": (["--reps", "5"], ["--reps", "3", "--requests", "1000"], 300),
    "vsock": (["--reps", "5"], ["--reps", "3", "--mib", "64", "--idle", "2"], 300),
    "faults": (["--reps", "5"], ["--reps", "3", "--requests", "12800", "--frames", "12800",
                                  "--seconds", "2"], 300),
    "snapshot": (["--reps", "5"], ["--reps", "3"], 1200),
    "inguest": (["--reps", "3", "--total", "1380"], ["--reps", "1", "--vmms", "pyvmm-mmio,qemu"], 1500),
    "memory": (["--guest", "both", "--reps", "5", "--linux-reps", "1"],
               ["--guest", "tiny", "--reps", "3"], 900),
    "startstop": (["--reps", "5"], ["--reps", "3"], 240),
    "guest": (["--reps", "1"], ["--reps", "1"], 1200),
}
RUN_JSON = os.path.join(common.RESULTS, "run.json")


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


# -- the child: one module, in its own process --------------------------------------
ADAPTERS = {}        # name: callable(module, argv) for a module whose main() saves nothing


def child(name, status_path, argv):
    """Import bench.<name>, call its main(argv), make sure its figures are in
    bench/results/<name>.json; write {"status", "error", "note"} to status_path."""
    st = {"status": "error"}
    t0 = time.time()
    try:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                st = {"status": "absent", "error": f"bench/{name}.py does not exist"}
                return 0
            raise
        call = ADAPTERS.get(name, lambda m, a: m.main(a))
        try:
            res = call(mod, argv)
        except SystemExit as e:       # argparse rejected the arguments: the module failed
            if e.code in (0, None):
                raise
            st["error"] = f"exited with status {e.code} (arguments: {' '.join(argv) or 'none'})"
            return 0
        path = os.path.join(common.RESULTS, f"{name}.json")
        if os.path.exists(path) and os.path.getmtime(path) >= t0 - 1:
            st["status"] = "ok"
        elif isinstance(res, dict) and res:
            common.save(name, res)
            st["status"] = "ok"
        else:
            st["error"] = "the module saved and returned no results"
    except BaseException as e:
        traceback.print_exc()
        st["error"] = f"{type(e).__name__}: {e}".strip()[:500]
    finally:
        with open(status_path, "w") as f:
            json.dump(st, f)
    return 0


# -- the parent --------------------------------------------------------------------
def ensure_qemu():
    if common.have_qemu():
        return True
    if os.geteuid() != 0:
        print("QEMU is not installed, so figures are pyvmm-only; for the side-by-side "
              "reference run: sudo apt-get install qemu-system-x86", file=sys.stderr)
        return False
    print("installing qemu-system-x86 (apt-get) for the side-by-side reference ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env)
        subprocess.run(cmd, env=env)
    ok = common.have_qemu()
    if not ok:
        print("could not install qemu-system-x86: figures are pyvmm-only", file=sys.stderr)
    return ok


def host_info():
    info = {"cpu": "", "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if os.path.exists("/sys/module/kvm_pvm"):
        info["kvm"] = "software (kvm_pvm)"
    elif os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd"):
        info["kvm"] = "hardware"
    if common.have_qemu():
        try:
            out = subprocess.run([common.QEMU, "--version"], capture_output=True, text=True, timeout=10)
            info["qemu"] = out.stdout.split("\n")[0].replace("QEMU emulator version ", "")
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def stop_group(p, grace=20):
    """SIGTERM the child's process group (the child and the VMMs it started),
    SIGKILL what is left after `grace` seconds.  The child turns SIGTERM into
    SystemExit, so its `with`/`finally` blocks run first: a module's network
    namespace and scratch files are removed rather than leaked.  The group is
    killed, not just the child: a VMM still stopping (or ignoring SIGTERM)
    when the child has exited would otherwise be left running."""
    deadline = time.monotonic() + grace
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:      # the rest of the group, in the time left
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run_module(name, argv, limit):
    """Run one module in a child process group; returns its status dict.
    Its previous result file is removed first, so a module that fails leaves
    no figures behind (the report would otherwise show an old run's)."""
    try:
        os.unlink(os.path.join(common.RESULTS, f"{name}.json"))
    except FileNotFoundError:
        pass
    fd, status_path = tempfile.mkstemp(prefix=f"pyvmm-bench-{name}-", suffix=".json")
    os.close(fd)
    os.unlink(status_path)
    cmd = [sys.executable, "-m", "bench", "--child", name, status_path, *argv]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        p.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    except KeyboardInterrupt:
        stop_group(p)
        raise
    if timed_out or p.returncode is None:
        stop_group(p)
    st = {"status": "error", "error": f"child exited with status {p.returncode}"}
    try:
        with open(status_path) as f:
            st = json.load(f)
        os.unlink(status_path)
    except (OSError, ValueError):
        pass
    if timed_out:
        st = {"status": "timeout", "error": f"stopped after {limit:.0f} s (time limit)"}
    st["seconds"] = round(time.monotonic() - t0, 1)
    st["argv"] = argv
    return st


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # the parent's stop_group()
        return child(argv[1], argv[2], argv[3:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about 5 minutes)")
    ap.add_argument("--only", metavar="NAME[,NAME]",
                    help=f"run only these modules ({','.join(MODULES)})")
    ap.add_argument("--budget", type=float, default=60, metavar="MINUTES",
                    help="stop starting modules after this many minutes (default 60)")
    args = ap.parse_args(argv)
    names = list(MODULES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in MODULES]
        if bad:
            ap.error(f"unknown module(s) {','.join(bad)}; choose from {','.join(MODULES)}")
    os.makedirs(common.RESULTS, exist_ok=True)
    if not args.only:           # a full run starts from nothing: no figure of an older run
        for path in glob.glob(os.path.join(common.RESULTS, "*.json")):
            os.unlink(path)
    ensure_qemu()
    run = {}
    if args.only and os.path.exists(RUN_JSON):   # a partial run keeps the others' status
        try:
            with open(RUN_JSON) as f:
                run = json.load(f)
        except (OSError, ValueError):
            run = {}
    run.update({"started": now(), "quick": args.quick, "host": host_info()})
    run.setdefault("modules", {})
    deadline = time.monotonic() + args.budget * 60
    for i, name in enumerate(names, 1):
        full, quick, limit = MODULES[name]
        margs = quick if args.quick else full
        left = deadline - time.monotonic()
        print(f"\n=== [{i}/{len(names)}] {name} {' '.join(margs)}", flush=True)
        if left < 30:
            st = {"status": "skipped", "error": f"time budget of {args.budget:g} min used up"}
        else:
            st = run_module(name, margs, min(limit, left))
        st["finished"] = now()
        run["modules"][name] = st
        print(f"=== {name}: {st['status']}" + (f" ({st['error']})" if st.get("error") else "")
              + (f" in {st['seconds']} s" if "seconds" in st else ""), flush=True)
        run["finished"] = now()
        common.save("run", run)
    print()
    from bench import report
    report.build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
