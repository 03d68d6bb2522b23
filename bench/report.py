"""Collect bench/results/*.json into one report:

- bench/results/latest.json: every figure as a row (figure, unit, pyvmm
  min/median/max, reference and its min/median/max, ratio of medians
  pyvmm/reference, which direction is better, goal and whether it is met),
  plus where each module's results came from and the last run's status;
- bench/results/latest.md: the same as a Markdown table;
- bench/results/latest.png: a chart (matplotlib): an overview of every ratio,
  then one small panel per figure, pyvmm against its reference with
  min-max whiskers.

Each benchmark module saves its own JSON shape; a normalizer per module turns
it into rows (modules still being written get defensive normalizers that look
for keys and skip what is absent; anything else with pyvmm/qemu stats is
picked up by a generic one).

`python -m bench.report` (run by `python -m bench` at the end).
"""
import datetime
import glob
import json
import os
import statistics
import sys

from bench.common import RESULTS

RESERVED = ("latest", "run")          # files in RESULTS that are not module results
ORDER = ["boot", "startup", "exits", "pio", "blk", "net", "starve", "api", "vsock", "faults",
         "snapshot", "inguest", "memory", "startstop", "guest"]
QEMU = "QEMU microvm"


# -- helpers -------------------------------------------------------------------
def as_stats(v, scale=1.0):
    """A {min, median, max, n} dict from a stats dict, a list of samples or a
    number; None if `v` is none of those."""
    if isinstance(v, dict) and "median" in v:
        med = v["median"]
        out = {"min": v.get("min", med) * scale, "median": med * scale,
               "max": v.get("max", med) * scale, "n": v.get("n", 1)}
        if v.get("failed"):
            out["failed"] = v["failed"]
        return out
    if isinstance(v, dict) and v.get("failed"):      # every sample failed
        return {"all_failed": v["failed"]}
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
        return {"min": min(v) * scale, "median": statistics.median(v) * scale,
                "max": max(v) * scale, "n": len(v)}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"min": v * scale, "median": v * scale, "max": v * scale, "n": 1}
    return None


def row(module, family, figure, unit, pyvmm, ref_name=None, ref=None, higher_is_better=True,
        goal=None, note=None):
    """goal: (op, value) on the ratio pyvmm/ref, op '>=' or '<='."""
    if pyvmm is None:
        return None
    failed = []
    if "all_failed" in pyvmm:
        failed.append(f"pyvmm: all {pyvmm['all_failed']} samples failed")
        pyvmm = None
    if ref and "all_failed" in ref:
        failed.append(f"{ref_name}: all {ref['all_failed']} samples failed")
        ref = None
    for who, s in (("pyvmm", pyvmm), (ref_name, ref)):
        if s and s.get("failed"):
            failed.append(f"{who}: {s['failed']} of {s['failed'] + s['n']} samples failed")
    if failed:
        note = "; ".join(filter(None, [note] + failed))
    r = {"module": module, "family": family, "figure": figure, "unit": unit,
         "pyvmm": pyvmm, "ref_name": ref_name if ref else None, "ref": ref,
         "ratio": None, "higher_is_better": higher_is_better, "goal": None, "goal_met": None}
    if pyvmm and ref and ref["median"]:
        r["ratio"] = pyvmm["median"] / ref["median"]
        if goal:
            op, val = goal
            r["goal"], r["goal_op"], r["goal_value"] = f"{op} {val:.2g}", op, val
            r["goal_met"] = r["ratio"] >= val if op == ">=" else r["ratio"] <= val
    if note:
        r["note"] = note
    return r


def vs_qemu(d, key, module, family, figure, unit, scale=1.0, higher=True, goal=None):
    v = d.get(key)
    if not isinstance(v, dict):
        return None
    return row(module, family, figure, unit, as_stats(v.get("pyvmm"), scale), QEMU,
               as_stats(v.get("qemu"), scale), higher, goal)


# -- normalizers: module JSON -> rows ---------------------------------------------
def norm_boot(d):
    return [vs_qemu(d, "first_instruction_s", "boot", "Boot", "start → first guest instruction",
                    "ms", 1000, higher=False, goal=("<=", 1.0)),     # issue #16, start-up
            vs_qemu(d, "boot_to_init_s", "boot", "Boot", 'start → "Run /init"', "s",
                    higher=False, goal=("<=", 1.0))]


def norm_exits(d):
    return [vs_qemu(d, "mmio_exits_per_s", "exits", "Exits", "MMIO exits (unassigned address)",
                    "exits/s")]


def inverse(st):
    """Stats of 1/x from stats of x (a per-exit cost -> exits per second)."""
    if not st or not st["min"]:
        return None
    return {"min": 1 / st["max"], "median": 1 / st["median"], "max": 1 / st["min"], "n": st["n"]}


def norm_pio(d):
    """bench/pio.py (written alongside): {case label: {"pyvmm": stats, "qemu":
    stats, "ratio"}} where the stats are seconds per exit, plus
    "bar_vs_qemu_uart_ratio" (the pyvmm-only virtio-pci BAR case is set
    against QEMU's UART register).  Shown as exits/s (higher is better), goal:
    cost within 2x of QEMU's (ratio >= 0.5).  Top-level {"pyvmm", "qemu"}
    dicts under a key ending in _per_s are taken as exits/s as they are."""
    rows = []
    uart_q = next((v.get("qemu") for k, v in d.items() if isinstance(v, dict)
                   and "uart" in k.lower() and isinstance(v.get("qemu"), dict)), None)
    for key, v in d.items():
        if not (isinstance(v, dict) and isinstance(v.get("pyvmm"), dict)):
            continue
        k = key.lower()
        if k.endswith("per_s"):
            fig = "port I/O exits" if k in ("pio_exits_per_s", "exits_per_s") else f"port I/O: {pretty(key)}"
            rows.append(vs_qemu(d, key, "pio", "Exits", fig, "exits/s", goal=(">=", 0.5)))
            continue
        py, ref, ref_name = inverse(as_stats(v["pyvmm"])), None, QEMU
        if isinstance(v.get("qemu"), dict):
            ref = inverse(as_stats(v["qemu"]))
        elif "queue_sel" in k and uart_q and "bar_vs_qemu_uart_ratio" in d:
            ref, ref_name = inverse(as_stats(uart_q)), "QEMU microvm (UART register)"
        rows.append(row("pio", "Exits", f"port I/O exits, {key}", "exits/s", py, ref_name, ref,
                        True, (">=", 0.5) if ref else None))
    return rows


def _blk_kind(kind):
    """(scale, unit, words) of a blk figure kind: 64 KiB ones in MB/s."""
    if kind == "seq64k":
        return 65536 / 1e6, "MB/s", "64 KiB sequential"
    return 1.0, "req/s", {"rand4k": "4 KiB random"}.get(kind, kind)


def _blk_path_rows(d, device, family, goals):
    """One row per (figure, transport/engine) of `device`, each against the
    plain programs timed next to that path's runs (else the figure's limit)."""
    rows = []
    for key, paths in device.items():
        kind, rw, qd = key.split()
        scale, unit, what = _blk_kind(kind)
        for path, st in paths.items():
            transport, engine = path.split()
            lim = d.get("limit_by_path", {}).get(key, {}).get(path) or d.get("limit", {}).get(key)
            rows.append(row("blk", family.format(transport=transport, engine=engine),
                            f"{what} {rw}s, {qd}", unit, as_stats(st, scale),
                            f"plain {lim['how']} (limit)" if lim else None,
                            as_stats(lim, scale) if lim else None, True, goals(qd)))
    return rows


def norm_blk(d):
    """bench/blk.py: {"device": {"<kind> <read|write> QD<n>": {"<transport> <engine>":
    stats req/s}}, "limit": {same key: stats + "how"}, "processing_cost":
    {"<kind> read": stats}}.  64 KiB figures are shown in MB/s."""
    rows = _blk_path_rows(d, d.get("device", {}), "virtio-blk real path ({transport}, {engine})",
                          lambda qd: (">=", 0.8) if qd != "QD1" else (">=", 0.5))
    dp = d.get("driver_polls", {})      # labelled harness variant: the driver spins too
    rows += _blk_path_rows(d, dp.get("device", {}),
                           "virtio-blk real path ({transport}, {engine}), driver polls <= "
                           f"{dp.get('spin_us')} us (KVM halt-polling analog)", lambda qd: None)
    oc = d.get("one_cpu", {})           # labelled placement variant: both threads on CPU 0
    rows += _blk_path_rows(d, oc.get("device", {}),
                           "virtio-blk real path ({transport}, {engine}), driver and I/O thread "
                           "pinned to one CPU (no cross-CPU wake-up)", lambda qd: None)
    for key, paths in d.get("two_core_reference", {}).items():
        scale, unit, _ = _blk_kind(key.split()[0])
        for path, ref in paths.items():
            st = d.get("device", {}).get(key, {}).get(path)
            rows.append(row("blk", f"virtio-blk real path ({path}) vs two cores of plain I/O",
                            f"{key} (reference, not the limit: the device has one I/O thread)",
                            unit, as_stats(st, scale) if st else None,
                            f"plain {ref['how']} (two-core reference)", as_stats(ref, scale), True))
    for label, st in d.get("wakeup", {}).get("variants", {}).items():
        rows.append(row("blk", "Wake-up round trip between two threads (no virtio)",
                        f"{label}, {'both sleep until woken' if st.get('blocking') else 'both spin'}",
                        "µs", as_stats(st, 1e6), higher_is_better=False))
    for key, b in d.get("qd1_bound", {}).items():
        scale, unit, _ = _blk_kind(key.split()[0])
        v = b["req_s"] * scale
        how = b.get("how", "eventfd ping-pong")
        rows.append(row("blk", f"QD1 wake-up bound (fastest sleeping hand-off: {how}; + plain I/O)",
                        f"{key}: best a two-thread path that sleeps when idle can do here", unit,
                        {"min": v, "median": v, "max": v, "n": 1}))
    for key, st in d.get("processing_cost", {}).items():
        scale, unit, _ = _blk_kind(key.split()[0])
        rows.append(row("blk", "virtio-blk device processing cost only",
                        f"{key}s, in-thread (no eventfd, no I/O thread, no interrupt)", unit,
                        as_stats(st, scale)))
    return rows


def norm_net(d):
    """bench/net.py: {"device": {"<small|64k> <TX|RX>": {transport: stats frames/s}},
    "limit": {same key: stats}, "frame_bytes": {kind: bytes}}; small frames in
    packets/s, 64 KiB frames in Gbit/s."""
    rows = []
    sizes = d.get("frame_bytes", {"small": 60, "64k": 65535})
    for key, per in d.get("device", {}).items():
        kind, dirn = key.split()
        scale, unit = (sizes.get(kind, 65535) * 8 / 1e9, "Gbit/s") if kind == "64k" else (1.0, "pkt/s")
        what = "64 KiB frames" if kind == "64k" else f"{sizes.get(kind, 60)}-byte frames"
        for transport, st in per.items():
            lim = (d.get("limit_by_path", {}).get(key, {}).get(transport)
                   or d.get("limit", {}).get(key))       # timed next to this transport's runs
            rows.append(row("net", f"virtio-net real path ({transport})", f"{dirn} {what}", unit,
                            as_stats(st, scale), f"plain tap {'write' if dirn == 'TX' else 'read'} loop (limit)",
                            as_stats(lim, scale) if lim else None, True, (">=", 0.8)))
    return rows


def norm_memory(d):
    rows = []
    for g, gname in (("tiny", "tiny guest, 128 MiB touched"), ("linux", "Linux at its shell")):
        v = d.get(g)
        if not isinstance(v, dict):
            continue
        for k, what in (("rss", "RSS"), ("anon", "anonymous memory")):
            py, q = v.get("pyvmm", {}).get(k), v.get("qemu", {}).get(k)
            rows.append(row("memory", "Memory", f"VMM overhead, {what} ({gname})", "MiB",
                            as_stats(py), QEMU, as_stats(q), False,
                            ("<=", 0.5) if k == "rss" else ("<=", 1.0)))
    return rows


def norm_startup(d):
    """bench/startup.py: {"steps": {step: stats s}, "qemu_total": stats s}."""
    rows = []
    steps = d.get("steps", {})
    for k, st in steps.items():
        if k == "total":
            rows.append(row("startup", "Start-up", "pyvmm run → first guest instruction (total)", "ms",
                            as_stats(st, 1000), QEMU, as_stats(d.get("qemu_total"), 1000), False,
                            ("<=", 1.0)))
        else:
            rows.append(row("startup", "Start-up step (pyvmm only)", k, "ms", as_stats(st, 1000),
                            higher_is_better=False))
    return rows


def norm_inguest(d):
    """bench/inguest.py: {"figures": {figure: {"pyvmm-mmio"|"pyvmm-pci"|"qemu": stats}},
    "units": {figure: unit}}; ping is a latency (lower is better)."""
    rows = []
    units = d.get("units", {})
    for fig, per in d.get("figures", {}).items():
        lower = fig.startswith("ping")
        q = as_stats(per.get("qemu"))
        for vmm in ("pyvmm-mmio", "pyvmm-pci"):
            if vmm not in per:
                continue
            label = {"disk read 4k": "O_DIRECT 4 KiB reads", "disk write 4k": "O_DIRECT 4 KiB writes",
                     "disk read 1m": "O_DIRECT 1 MiB reads", "disk write 1m": "O_DIRECT 1 MiB writes",
                     "tcp guest->host": "TCP guest → host", "ping rtt": "ping guest → host, average RTT"
                     }.get(fig, fig)
            if fig in d.get("pooled", {}):      # min / median / max over every read or reply
                label = {"disk read 1m": "O_DIRECT 1 MiB reads, each read (all runs pooled)",
                         "ping rtt": "ping guest → host, RTT of each reply but a run's first "
                                     "(all runs pooled)"}.get(fig, label)
            rows.append(row("inguest", f"In guest ({vmm.split('-')[1]} transport)", label,
                            units.get(fig, ""), as_stats(per[vmm]), QEMU + " (virtio-mmio)", q,
                            not lower, ("<=", 1.0) if lower else (">=", 1.0)))
    phases = d.get("guest_irqs_per_op", {}).get("phases", {})
    for phase, what in (("ping", "per ping"), ("read1m", "per O_DIRECT 1 MiB read")):
        for kind in ("virtio", "timer"):
            per = phases.get(phase, {}).get(kind, {})
            q = as_stats(per.get("qemu"))
            for vmm in ("pyvmm-mmio", "pyvmm-pci"):
                if vmm in per:
                    rows.append(row("inguest", f"In guest ({vmm.split('-')[1]} transport)",
                                    f"guest {'virtio' if kind == 'virtio' else 'local timer'} "
                                    f"interrupts {what} (its /proc/interrupts)", "irqs",
                                    as_stats(per[vmm]), QEMU + " (virtio-mmio)", q, False))
    return rows


def norm_starve(d):
    """bench/starve.py: NIC RX latency (median, p99 in us) idle and during a disk flush storm."""
    rows = []
    idle, busy = d.get("idle"), d.get("flush storm")
    if not (isinstance(idle, dict) and isinstance(busy, dict)):
        return rows
    for k, what in (("median_us", "median"), ("p99_us", "99th percentile")):
        rows.append(row("starve", "Isolation", f"NIC RX latency during a disk flush storm, {what}",
                        "µs", as_stats(busy.get(k)), "same, disk idle", as_stats(idle.get(k)), False))
    return rows


def norm_startstop(d):
    return [vs_qemu(d, "vms_per_s", "startstop", "Start/stop", "VMs started and stopped (10 in a row)",
                    "VMs/s")]


def norm_guest(d):
    out = []
    for key, fig, unit, scale in (("syscall_ns", "guest getppid() system call", "ns", 1),
                                  ("init_to_prompt_s", '"Run /init" → shell prompt', "s", 1),
                                  ("boot_to_poweroff_s", "boot → power-off", "s", 1)):
        out.append(row("guest", "Guest (pyvmm only)", fig, unit, as_stats(d.get(key), scale),
                       higher_is_better=False))
    return out


def norm_api(d):
    """bench/api.py: control-API costs (the reference is Firecracker's 8 CPU ms)."""
    fam = "Control API"
    g = d.get("get_root_us", {})
    out = [row("api", fam, "process start → API socket accepting (wall)", "ms",
               as_stats(d.get("socket_ready_wall_ms")), higher_is_better=False),
           row("api", fam, "process start → API socket accepting (CPU)", "ms",
               as_stats(d.get("socket_ready_cpu_ms")), "Firecracker target",
               as_stats(d.get("firecracker_target_cpu_ms")), False),
           row("api", fam, "process start → first GET / answered (wall)", "ms",
               as_stats(d.get("first_get_answered_wall_ms")), higher_is_better=False),
           row("api", fam, "process start → first GET / answered (CPU, all threads)", "ms",
               as_stats(d.get("first_get_answered_cpu_ms")), higher_is_better=False),
           row("api", fam, "python -c pass, spawn → exit (the interpreter's floor)", "ms",
               as_stats(d.get("python_c_pass_wall_ms")), higher_is_better=False)]
    for client in ("http_client", "raw_socket"):
        for p in ("p50", "p99"):
            v = g.get(client, {}).get(p)
            out.append(row("api", fam, f"GET / round trip, {client.replace('_', ' ')} {p}", "µs",
                           as_stats(v), higher_is_better=False))
    out.append(row("api", fam, "InstanceStart → first guest instruction", "ms",
                   as_stats(d.get("instance_start_to_first_instruction_ms")),
                   higher_is_better=False))
    mem = d.get("api_thread_memory", {})
    out.append(row("api", fam, "memory added by the API thread", "KiB",
                   as_stats(mem.get("after_requests_kib")), higher_is_better=False))
    return out


def pretty(key):
    return key.replace("_per_s", "/s").replace("_", " ")


def norm_generic(module, d):
    """Any {"pyvmm": stats, "qemu"|"limit": stats} dict, at any depth."""
    rows = []

    def walk(v, path):
        if isinstance(v, dict):
            if "pyvmm" in v and as_stats(v["pyvmm"]):
                ref_key = next((k for k in v if k != "pyvmm" and as_stats(v[k])), None)
                name = " ".join(path) or module
                higher = not any(name.endswith(s) for s in ("_s", "_ns", "_us", "_ms", "mib"))
                rows.append(row(module, module, pretty(name), "", as_stats(v["pyvmm"]),
                                QEMU if ref_key == "qemu" else ref_key,
                                as_stats(v[ref_key]) if ref_key else None, higher))
                return
            for k, x in v.items():
                walk(x, path + [str(k)])
    walk(d, [])
    return rows


def norm_vsock(d):
    """bench/vsock.py: {"host_to_guest"|"guest_to_host": {"device", "socketpair"} in
    MB/s, "idle_cpu_fraction"(_no_connection): stats}."""
    rows = []
    for key, label in (("host_to_guest", "host → guest"), ("guest_to_host", "guest → host")):
        v = d.get(key)
        if isinstance(v, dict):
            rows.append(row("vsock", "virtio-vsock", f"stream {label} via device (mock driver)",
                            "MB/s", as_stats(v.get("device")), "Unix socketpair",
                            as_stats(v.get("socketpair")), True, (">=", 0.8)))
    rows.append(row("vsock", "virtio-vsock", "CPU of an idle device (one idle connection)",
                    "% of a core", as_stats(d.get("idle_cpu_fraction"), 100),
                    higher_is_better=False))
    if d.get("idle_cpu_fraction_no_connection") is not None:
        rows.append(row("vsock", "virtio-vsock", "CPU of an idle device (no connection)",
                        "% of a core", as_stats(d["idle_cpu_fraction_no_connection"], 100),
                        higher_is_better=False))
    return rows


def norm_snapshot(d):
    """bench/snapshot.py: create time/size of a Full and a Diff snapshot, the
    restores (ms stats), the cold boot to the shell (s) of the same guest."""
    fam, mem = "Snapshot", d.get("mem", "?")
    rows = []
    for k in ("full", "diff"):
        f = d.get(k) or {}
        if "create_ms" in f:
            rows.append(row("snapshot", fam, f"{k.capitalize()} snapshot create ({mem} guest at "
                            f"its shell; {f.get('mem_mib', 0):.1f} MiB written)", "ms",
                            as_stats(f["create_ms"]), higher_is_better=False))
    for key, label, goal in (
            ("restore_api_to_running_ms", "restore: PUT /snapshot/load in a running VMM → "
             "vCPUs running (Firecracker's restore latency)", True),
            ("restore_to_running_ms", "restore: `pyvmm restore` process start → vCPUs running",
             False),
            ("restore_in_process_ms", "restore: of which the VM built from the files", False),
            ("restore_to_shell_answer_ms", "restore: process start → shell answered a command",
             False)):
        if d.get(key) is not None:
            rows.append(row("snapshot", fam, label, "ms", as_stats(d[key]), higher_is_better=False,
                            note="goal: under 50 ms" if goal else None))
    if d.get("cold_boot_to_shell_s") is not None:
        rows.append(row("snapshot", fam, "cold boot → shell prompt, same guest (for comparison)",
                        "s", as_stats(d["cold_boot_to_shell_s"]), higher_is_better=False))
    return rows


NORMALIZERS = {"boot": norm_boot, "snapshot": norm_snapshot, "exits": norm_exits, "pio": norm_pio, "blk": norm_blk,
               "net": norm_net, "memory": norm_memory, "startstop": norm_startstop,
               "guest": norm_guest, "startup": norm_startup, "inguest": norm_inguest,
               "starve": norm_starve, "api": norm_api, "vsock": norm_vsock}


# -- collecting --------------------------------------------------------------------
def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def iso(ts):
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def collect(results=RESULTS):
    run = load_json(os.path.join(results, "run.json")) or {}
    sources, rows, details = {}, [], {}
    files = {os.path.splitext(os.path.basename(p))[0]: p
             for p in glob.glob(os.path.join(results, "*.json"))}
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER
                                                      and n not in RESERVED)
    status = run.get("modules", {})
    for name in names:
        path = files[name]
        if name in status and status[name].get("status") != "ok":
            # the run says this module failed: a file left by an earlier run is not its figure
            sources[name] = {"file": os.path.relpath(path, os.path.dirname(results)),
                             "error": "ignored: the module failed in the last run"}
            continue
        d = load_json(path)
        src = {"file": os.path.relpath(path, os.path.dirname(results)), "measured": iso(os.path.getmtime(path))}
        if not isinstance(d, dict):
            src["error"] = "unreadable JSON"
            sources[name] = src
            continue
        try:
            got = NORMALIZERS.get(name, lambda x: [])(d)
            got = [r for r in got if r]
            if not got:
                got = [r for r in norm_generic(name, d) if r]
        except Exception as e:          # a shape we did not foresee: report, do not fail
            got, src["error"] = [], f"normalizer: {type(e).__name__}: {e}"
        src["rows"] = len(got)
        sources[name] = src
        rows += got
        if name == "startup":
            details["startup"] = {"steps": d.get("steps"), "imports": d.get("imports")}
        if name == "memory" and isinstance(d.get("tiny"), dict):
            details["memory"] = {k: d["tiny"].get(k) for k in ("pyvmm_breakdown_mib",
                                                              "pyvmm_python_allocations")}
    return {"generated": iso(datetime.datetime.now().timestamp()), "host": run.get("host", {}),
            "run": {k: run.get(k) for k in ("started", "finished", "quick") if k in run},
            "modules": run.get("modules", {}), "sources": sources, "rows": rows,
            "details": details}


# -- Markdown --------------------------------------------------------------------
def num(v):
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def trio(s):
    return f"{num(s['min'])} / **{num(s['median'])}** / {num(s['max'])}"


def markdown(rep):
    lines = ["| Figure | Unit | pyvmm min / **median** / max | Reference | Reference min / **median** / max "
             "| pyvmm ÷ ref | Goal |", "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        arrow = "↑" if r["higher_is_better"] else "↓"
        ref = trio(r["ref"]) if r["ref"] else "–"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "–"
        goal = "–"
        if r["goal"]:
            goal = f"{r['goal'].replace('<=', '≤').replace('>=', '≥')} {'✅' if r['goal_met'] else '❌'}"
        fig = f"{r['family']}: {r['figure']}" + (f" ({r['note']})" if r.get("note") else "")
        py = trio(r["pyvmm"]) if r["pyvmm"] else "**failed**"
        lines.append(f"| {fig} | {r['unit']} {arrow} | {py} | "
                     f"{r['ref_name'] or '–'} | {ref} | {ratio} | {goal} |")
    notes = []
    for name, m in sorted(rep["modules"].items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99):
        if m.get("status") != "ok":     # a failed module is a row of its own, never old figures
            why = f"{m.get('status')}: {m.get('error', '')}".rstrip(": ").replace("|", "/")
            lines.append(f"| **{name}: FAILED, not measured** ({why}) | | | | | | |")
            notes.append(f"- `{name}`: {why}")
    for name, src in rep["sources"].items():
        if src.get("error"):
            notes.append(f"- `{name}`: {src['error']}")
    out = ["\n".join(lines), "",
           "↑/↓: higher/lower is better. Ratio = pyvmm median ÷ reference median; goals apply to it. "
           "QEMU is `qemu-system-x86_64 -M microvm` with the same guest; limits are plain "
           "syscalls on the same image or tap."]
    when = [f"{n} {src['measured'].replace('T', ' ')[:16]}" for n, src in rep["sources"].items()
            if src.get("rows")]
    if when:
        out.append("Measured: " + ", ".join(when) + ".")
    h = rep.get("host") or {}
    if h:
        out.append("Host: " + ", ".join(f"{k} {v}" for k, v in h.items() if v) + ".")
    if notes:
        out += ["", "Notes:"] + notes
    out += details_md(rep.get("details") or {})
    return "\n".join(out) + "\n"


def details_md(det):
    """The start-up and memory breakdowns, as small tables."""
    out = []
    st = det.get("startup") or {}
    if st.get("steps"):
        out += ["", "Where `pyvmm run`'s time to the first guest instruction goes (median of the "
                "runs, ms; bench/startup.py):", "", "| Step | ms |", "|---|---|"]
        out += [f"| {k} | {v['median'] * 1000:.1f} |" for k, v in st["steps"].items() if v]
    if st.get("imports"):
        out += ["", "Import self time by package, one `python -X importtime` of the tiny guest's `pyvmm run` (ms): "
                + ", ".join(f"{k} {v * 1000:.1f}" for k, v in st["imports"].items())]
    mem = det.get("memory") or {}
    bd = mem.get("pyvmm_breakdown_mib")
    if bd:
        out += ["", "pyvmm's own memory with the tiny guest, by kind of mapping (guest RAM left out; "
                "MiB; bench/memory.py):", "", "| Mapping | RSS | anonymous |", "|---|---|---|"]
        out += [f"| {k} | {v['rss']:.2f} | {v['anon']:.2f} |" for k, v in bd.items() if v["rss"] >= 0.01]
    pa = mem.get("pyvmm_python_allocations")
    if pa:
        per = pa.get("per_module_bytes", {})
        out += ["", "Python allocations still live when the vCPU starts, by module (tracemalloc, "
                "KiB; code objects of every module are counted under the interpreter's importer): "
                + ", ".join(f"{k} {v / 1024:.0f}" for k, v in list(per.items())[:15])
                + f". numpy loaded: {'yes' if any(m.startswith('numpy') for m in pa.get('numpy_or_cffi_modules', [])) else 'no'}."]
    return out


# -- chart ----------------------------------------------------------------------------
PY_C, REF_C, OK_C, BAD_C = "#3b6fb6", "#9a9a9a", "#2e9d5b", "#c8453c"


def chart(rep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [r for r in rep["rows"] if r["pyvmm"]]      # failed figures are in the table only
    if not rows:
        return None
    ncol = 4
    nrow = (len(rows) + ncol - 1) // ncol
    with_ref = [r for r in rows if r["ratio"] is not None]
    over_h = 0.6 + 0.3 * len(with_ref) if with_ref else 0
    fig = plt.figure(figsize=(4.3 * ncol, over_h + 3.1 * nrow + 0.9))
    outer = GridSpec(2 if with_ref else 1, 1, figure=fig,
                     height_ratios=[over_h + 0.4, 3.1 * nrow] if with_ref else [1], hspace=0.12,
                     top=1 - 0.8 / fig.get_figheight(), bottom=0.035, left=0.05, right=0.98)
    grid = GridSpecFromSubplotSpec(nrow, ncol, subplot_spec=outer[-1], hspace=0.8, wspace=0.35)
    top_row = GridSpecFromSubplotSpec(1, ncol, subplot_spec=outer[0]) if with_ref else None
    title = "pyvmm benchmarks"
    if rep.get("run", {}).get("finished"):
        title += f" — {rep['run']['finished'][:16].replace('T', ' ')}"
    h = rep.get("host") or {}
    if h.get("kvm"):
        title += f" — KVM: {h['kvm']}"
    fig.suptitle(title, fontsize=14, fontweight="bold", y=1 - 0.12 / fig.get_figheight())

    if with_ref:   # overview: how pyvmm does against each reference, "better" to the right
        ax = fig.add_subplot(top_row[0, 1:])         # its labels take the first column's room
        labels, vals, cols, goals = [], [], [], []
        for r in reversed(with_ref):
            perf = r["ratio"] if r["higher_is_better"] else 1 / r["ratio"]
            labels.append(f"{r['family']}: {r['figure']}  [vs {short_ref(r['ref_name'])}]")
            vals.append(perf)
            cols.append(PY_C if r["goal_met"] is None else OK_C if r["goal_met"] else BAD_C)
            g = None
            if r["goal"]:
                g = r["goal_value"] if r["higher_is_better"] else 1 / r["goal_value"]
            goals.append(g)
        y = list(range(len(vals)))
        ax.barh(y, vals, color=cols, height=0.65)
        ax.set_xscale("log")
        lo = min(vals + [g for g in goals if g] + [1])
        hi = max(vals + [g for g in goals if g] + [1])
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.axvline(1, color="black", lw=1)
        for i, (v, g) in enumerate(zip(vals, goals)):
            ax.text(v * 1.03, i, f"{v:.2f}×", va="center", fontsize=8)
            if g:
                ax.plot([g, g], [i - 0.45, i + 0.45], color="black", lw=2.5, zorder=3)
        ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20)
                 if lo / 1.6 <= t <= hi * 1.6]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(vals) - 0.4)
        ax.set_title("pyvmm relative to its reference, medians (right of 1× = pyvmm better; "
                     "black tick = goal; green/red = goal met/missed)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)

    yfmt = FuncFormatter(lambda v, _: num(v) if abs(v) >= 1e4 else f"{v:g}")
    for i, r in enumerate(rows):
        ax = fig.add_subplot(grid[i // ncol, i % ncol])
        bars = [("pyvmm", r["pyvmm"])] + ([(short_ref(r["ref_name"]), r["ref"])] if r["ref"] else [])
        meds = [s["median"] for _, s in bars]
        err = [[s["median"] - s["min"] for _, s in bars], [s["max"] - s["median"] for _, s in bars]]
        col = PY_C if r["goal_met"] is None else OK_C if r["goal_met"] else BAD_C
        ax.bar(range(len(bars)), meds, yerr=err, capsize=6, width=0.6,
               color=[col, REF_C][:len(bars)], error_kw={"lw": 1.2})
        top = max(s["max"] for _, s in bars) or 1
        for x, (_, s) in enumerate(bars):
            ax.text(x, s["max"] + top * 0.03, num(s["median"]), ha="center", va="bottom", fontsize=9)
        if r["goal"] and r["ref"]:
            v = r["goal_value"] * r["ref"]["median"]
            ax.axhline(v, color="black", lw=1, ls="--")
            ax.text(len(bars) - 0.45, v, "goal", va="bottom", ha="right", fontsize=7)
        ax.set_ylim(0, top * 1.22)
        ax.set_xlim(-0.6, max(1, len(bars) - 1) + 0.6)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([n for n, _ in bars], fontsize=8.5)
        ax.yaxis.set_major_formatter(yfmt)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel(f"{r['unit']}, {'higher' if r['higher_is_better'] else 'lower'} is better",
                      fontsize=7.5)
        if r["ratio"] is not None:
            sub = f"\npyvmm ÷ {short_ref(r['ref_name'])} = {r['ratio']:.2f}"
        else:
            sub = "\n(no reference)"
        ax.set_title(f"{r['family']}: {wrap(r['figure'], 40)}{sub}", fontsize=8.5)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def short_ref(name):
    if name == QEMU + " (virtio-mmio)":
        return "QEMU"
    if name and name.startswith("plain ") and name.endswith(" (limit)"):
        return "limit"
    return {"QEMU microvm": "QEMU", "QEMU microvm (UART register)": "QEMU UART",
            "preadv loop (limit)": "preadv", "plain tap read/write (limit)":
            "plain tap"}.get(name, name or "ref")


def wrap(text, width):
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])


# -- main ---------------------------------------------------------------------------
def build(results=RESULTS, quiet=False):
    rep = collect(results)
    with open(os.path.join(results, "latest.json"), "w") as f:
        json.dump(rep, f, indent=2, ensure_ascii=False)
    md = markdown(rep)
    with open(os.path.join(results, "latest.md"), "w") as f:
        f.write(md)
    png = os.path.join(results, "latest.png")
    try:
        chart(rep, png)
    except ImportError:
        png = None
        print("matplotlib is not installed: no chart (pip install matplotlib, or "
              "pip install -e '.[bench]')", file=sys.stderr)
    if not quiet:
        print(md)
        print("wrote", ", ".join(os.path.join(results, f"latest.{e}") for e in ("json", "md", "png")
                                   if e != "png" or png))
    return rep


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS, help="directory of the modules' JSON files")
    args = ap.parse_args(argv)
    build(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
