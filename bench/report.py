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
ORDER = ["boot", "exits", "pio", "blk", "net", "memory", "startstop", "guest", "vsock"]
QEMU = "QEMU microvm"


# -- helpers -------------------------------------------------------------------
def as_stats(v, scale=1.0):
    """A {min, median, max, n} dict from a stats dict, a list of samples or a
    number; None if `v` is none of those."""
    if isinstance(v, dict) and "median" in v:
        med = v["median"]
        return {"min": v.get("min", med) * scale, "median": med * scale,
                "max": v.get("max", med) * scale, "n": v.get("n", 1)}
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
    r = {"module": module, "family": family, "figure": figure, "unit": unit,
         "pyvmm": pyvmm, "ref_name": ref_name if ref else None, "ref": ref,
         "ratio": None, "higher_is_better": higher_is_better, "goal": None, "goal_met": None}
    if ref and ref["median"]:
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
                    "ms", 1000, higher=False),
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


def norm_blk(d):
    """blk.json as written by `python -m bench` (bench/__main__.py captures
    bench/blk.py's results): {"rand4k_iops"|"seq64k_MBps": {label: stats}};
    reference: the C preadv loop on the same page-cached image (the limit)."""
    rows = []
    for key, fig, unit in (("rand4k_iops", "4 KiB random reads", "req/s"),
                           ("seq64k_MBps", "64 KiB sequential reads", "MB/s")):
        v = d.get(key)
        if not isinstance(v, dict):
            continue
        devs = [k for k in v if "device" in k.lower()]
        dev = next((v[k] for k in devs if "c engine" in k.lower() or k.lower() == "device_c"),
                   v[devs[0]] if devs else None)
        lim = next((v[k] for k in v if k.lower().startswith("preadv")), None)
        rows.append(row("blk", "virtio-blk", f"{fig} via device", unit, as_stats(dev),
                        "preadv loop (limit)", as_stats(lim), True, (">=", 0.8)))
    return rows


def norm_net(d):
    """Assumed from bench/net.py as it stood (being written): keys
    "<small|64k> <TX|RX> device" and "<small|64k> <TX|RX> plain write()|read()",
    each {"pps": [samples], "gbit_median": x}; small frames are reported in
    packets/s, 64 KiB frames in Gbit/s (samples scaled by gbit_median /
    median(pps), or taken from a "gbit" sample list if present).  Reference:
    the plain write()/read() loop on the same tap (the limit)."""
    rows = []

    def series(v, gbit):
        if not isinstance(v, dict):
            return as_stats(v) if not gbit else None
        if gbit:
            if "gbit" in v:
                return as_stats(v["gbit"])
            pps = as_stats(v.get("pps"))
            if pps and "gbit_median" in v and pps["median"]:
                return as_stats(v.get("pps"), v["gbit_median"] / pps["median"])
            return None
        return as_stats(v.get("pps"))

    for kind, gbit, label, unit in (("small", False, "small frames", "pkt/s"),
                                    ("64k", True, "64 KiB frames", "Gbit/s")):
        for dirn in ("TX", "RX"):
            dev_key = next((k for k in d if k.lower().startswith(f"{kind} {dirn} device".lower())), None)
            lim_key = next((k for k in d if k.lower().startswith(f"{kind} {dirn} plain".lower())), None)
            if dev_key is None:
                continue
            rows.append(row("net", "virtio-net", f"{dirn} {label} via device", unit,
                            series(d[dev_key], gbit), "plain tap read/write (limit)",
                            series(d.get(lim_key), gbit) if lim_key else None, True, (">=", 0.8)))
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
                            ("<=", 1 / 3) if k == "rss" else None))
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
               as_stats(d.get("firecracker_target_cpu_ms")), False)]
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
    MB/s, "idle_cpu_fraction": stats}."""
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
    return rows


NORMALIZERS = {"boot": norm_boot, "exits": norm_exits, "pio": norm_pio, "blk": norm_blk,
               "net": norm_net, "memory": norm_memory, "startstop": norm_startstop,
               "guest": norm_guest, "api": norm_api, "vsock": norm_vsock}


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
    sources, rows = {}, []
    files = {os.path.splitext(os.path.basename(p))[0]: p
             for p in glob.glob(os.path.join(results, "*.json"))}
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER
                                                      and n not in RESERVED)
    for name in names:
        path = files[name]
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
    return {"generated": iso(datetime.datetime.now().timestamp()), "host": run.get("host", {}),
            "run": {k: run.get(k) for k in ("started", "finished", "quick") if k in run},
            "modules": run.get("modules", {}), "sources": sources, "rows": rows}


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
        lines.append(f"| {r['family']}: {r['figure']} | {r['unit']} {arrow} | {trio(r['pyvmm'])} | "
                     f"{r['ref_name'] or '–'} | {ref} | {ratio} | {goal} |")
    notes = []
    for name, m in sorted(rep["modules"].items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99):
        if m.get("status") != "ok":
            src = rep["sources"].get(name)
            tail = f"; figures shown are from {src['measured']}" if src and src.get("rows") else ""
            notes.append(f"- `{name}`: {m.get('status')}: {m.get('error', '')}".rstrip(": ") + tail)
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
    return "\n".join(out) + "\n"


# -- chart ----------------------------------------------------------------------------
PY_C, REF_C, OK_C, BAD_C = "#3b6fb6", "#9a9a9a", "#2e9d5b", "#c8453c"


def chart(rep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = rep["rows"]
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
