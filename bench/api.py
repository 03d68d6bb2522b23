"""The control API's costs (issue #10):

- process start -> API socket accepting: wall ms (measured from outside:
  fork/exec until connect() succeeds) and CPU ms (the VMM's own
  process_startup_time_cpu_us metric, Firecracker's name, recorded as the
  socket starts listening; its published target is 8 CPU ms), for
  `pyvmm api --api-sock`; and process start -> first `GET /` answered (sent
  as soon as connect() succeeds: the server thread starts after the socket
  listens, so this is what a client waits for), wall and CPU ms (every
  thread's on-CPU time from /proc/PID/task/*/schedstat at that moment);
  beside them, `python -c pass` (spawn -> exit) as the interpreter's floor;
- `GET /` round trip over a kept-alive connection, 1,000 requests: p50/p99,
  through http.client (vmm.api.client) and with a raw socket (what the
  server itself costs);
- InstanceStart -> first guest instruction: from sending PUT /actions
  InstanceStart to reading the byte the tiny guest's first instruction
  writes to the serial port (vmm.testing.tinyguest), and the InstanceStart
  response time; with the VMM idle (1 s after its socket opened) and "cold"
  (InstanceStart at once, while the VMM's modules are still loading);
- memory the API thread adds: VmRSS of a process before and after starting
  the server, and after it served 1,000 requests.

`python -m bench.api [--reps N] [--requests 1000]`; min / median / max.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import save, stats
from vmm.api.client import ApiClient, wait_for_socket
from vmm.testing import tinyguest

MEM_CHILD = r"""
import os, sys, threading
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
from vmm.api.controller import Controller
from vmm.api.server import ApiServer
import vmm.api.schema, vmm.api.routes, vmm.vmconfig, json, selectors
ctl = Controller()
before = rss()
srv = ApiServer(sys.argv[1], ctl.handle, tick=ctl.tick)
srv.start()
started = rss()
print(json.dumps({"before_kib": before, "started_kib": started}), flush=True)
sys.stdin.readline()                      # the parent has sent its requests
print(json.dumps({"served_kib": rss(), "threads": threading.active_count()}), flush=True)
srv.close()
"""


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def cpu_ms(pid):
    """On-CPU time so far of every thread of `pid` (ns resolution, unlike
    /proc/PID/stat's clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e6


def interpreter_floor(reps):
    """`python -c pass`, spawn -> exit (wall ms), the same way as below."""
    out = []
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append((time.monotonic() - t0) * 1000)
    return out


def socket_ready(d, reps):
    """(wall to accepting, its CPU (the metric), wall to the first GET /
    answered, CPU then), ms, one list each."""
    wall, cpu, wall_first, cpu_first = [], [], [], []
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for i in range(reps):
        sock = os.path.join(d, f"start{i}.sock")
        metrics = os.path.join(d, f"m{i}.json")
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock,
                              "--metrics-path", metrics],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            s = None
            while time.monotonic() - t0 < 30 and p.poll() is None:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(sock)
                    break
                except OSError:
                    s.close()
                    s = None
                    time.sleep(0.0005)
            if s is None:
                raise RuntimeError("pyvmm api did not open its socket")
            wall.append((time.monotonic() - t0) * 1000)
            with s:
                s.sendall(req)
                data = b""
                while not data.endswith(b"}"):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise RuntimeError("pyvmm api closed the connection")
                    data += chunk
            wall_first.append((time.monotonic() - t0) * 1000)
            cpu_first.append(cpu_ms(p.pid))
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET / answered {data[:40]!r}")
            with ApiClient(sock) as api:
                api.action("FlushMetrics")
            line = json.loads(open(metrics).read().splitlines()[-1])
            cpu.append(line["api_server"]["process_startup_time_cpu_us"] / 1000)
        finally:
            p.terminate()
            p.wait(10)
    return wall, cpu, wall_first, cpu_first


def round_trips(d, n):
    sock = os.path.join(d, "rt.sock")
    p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        if not wait_for_socket(sock, 30, p):
            raise RuntimeError("pyvmm api did not open its socket")
        client = []
        with ApiClient(sock) as api:
            for _ in range(50):
                api.get("/")
            for _ in range(n):
                t = time.perf_counter()
                api.get("/")
                client.append((time.perf_counter() - t) * 1e6)
        raw = []
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
        for i in range(n + 50):
            t = time.perf_counter()
            s.sendall(req)
            data = b""
            while not data.endswith(b"}"):
                data += s.recv(4096)
            if i >= 50:
                raw.append((time.perf_counter() - t) * 1e6)
        s.close()
        return client, raw
    finally:
        p.terminate()
        p.wait(10)


def instance_start(d, reps, settle):
    """`settle` seconds between the socket accepting and InstanceStart: with 0
    the VMM's modules may still be loading (they load after the socket is up)."""
    kernel = tinyguest.make_elf(tinyguest.serial_text("A") + tinyguest.CLI_HLT,
                                os.path.join(d, "first.elf"))
    first, answered = [], []
    for i in range(reps):
        sock = os.path.join(d, f"is{i}.sock")
        p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            if not wait_for_socket(sock, 30, p):
                raise RuntimeError("pyvmm api did not open its socket")
            with ApiClient(sock) as api:
                api.put("/boot-source", {"kernel_image_path": kernel, "boot_args": "console=ttyS0"})
                api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
                time.sleep(settle)
                t0 = time.perf_counter()
                api.action("InstanceStart")
                answered.append((time.perf_counter() - t0) * 1000)
                if os.read(p.stdout.fileno(), 1) != b"A":
                    raise RuntimeError("the tiny guest did not write its byte")
                first.append((time.perf_counter() - t0) * 1000)
            if p.wait(30) != 0:
                raise RuntimeError("the tiny guest did not power off")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return first, answered


def memory(d, n):
    sock = os.path.join(d, "mem.sock")
    p = subprocess.Popen([sys.executable, "-c", MEM_CHILD, sock], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        a = json.loads(p.stdout.readline())
        with ApiClient(sock) as api:
            for _ in range(n):
                api.get("/")
            for _ in range(50):
                api.get("/vm/config")
        p.stdin.write("go\n")
        p.stdin.flush()
        b = json.loads(p.stdout.readline())
        return {"thread_and_socket_kib": a["started_kib"] - a["before_kib"],
                "after_requests_kib": b["served_kib"] - a["before_kib"],
                "process_rss_kib": b["served_kib"]}
    finally:
        p.wait(10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="process starts / InstanceStarts")
    ap.add_argument("--requests", type=int, default=1000, help="GET / round trips")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-api-") as d:
        floor = interpreter_floor(args.reps)
        wall, cpu, wall_first, cpu_first = socket_ready(d, args.reps)
        client, raw = round_trips(d, args.requests)
        first, answered = instance_start(d, args.reps, settle=1.0)
        cold, _ = instance_start(d, args.reps, settle=0.0)
        mem = memory(d, args.requests)
    res = {
        "socket_ready_wall_ms": stats(wall),
        "socket_ready_cpu_ms": stats(cpu),
        "first_get_answered_wall_ms": stats(wall_first),
        "first_get_answered_cpu_ms": stats(cpu_first),
        "python_c_pass_wall_ms": stats(floor),
        "firecracker_target_cpu_ms": 8,
        "get_root_us": {"requests": args.requests,
                        "http_client": {"p50": pct(client, 50), "p99": pct(client, 99)},
                        "raw_socket": {"p50": pct(raw, 50), "p99": pct(raw, 99)}},
        "instance_start_to_first_instruction_ms": stats(first),
        "instance_start_response_ms": stats(answered),
        "instance_start_to_first_instruction_cold_ms": stats(cold),
        "api_thread_memory": mem,
    }
    print(f"process start -> API socket accepting: {stats(wall)['median']:.1f} ms wall, "
          f"{stats(cpu)['median']:.1f} ms CPU (median of {args.reps}; goal < 40 ms wall, "
          f"Firecracker's target 8 CPU ms)")
    print(f"process start -> first GET / answered: {stats(wall_first)['median']:.1f} ms wall, "
          f"{stats(cpu_first)['median']:.1f} ms CPU; `python -c pass` takes "
          f"{stats(floor)['median']:.1f} ms wall")
    print(f"GET / round trip over {args.requests}: http.client p50 {pct(client, 50):.0f} µs "
          f"p99 {pct(client, 99):.0f} µs; raw socket p50 {pct(raw, 50):.0f} µs "
          f"p99 {pct(raw, 99):.0f} µs")
    print(f"InstanceStart -> first guest instruction: {stats(first)['median']:.1f} ms "
          f"(response after {stats(answered)['median']:.1f} ms; goal < 10 ms); "
          f"{stats(cold)['median']:.1f} ms right after the socket opens (modules still loading)")
    print(f"API thread memory: +{mem['thread_and_socket_kib']} KiB at start, "
          f"+{mem['after_requests_kib']} KiB after {args.requests} requests")
    print("saved", save("api", res))
    return res


if __name__ == "__main__":
    main()
