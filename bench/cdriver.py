"""Build and load bench/driver.c (the benchmarks' C driver loop and plain
tap loop) with cffi, once per source version, into bench/_build/.  Bench
code only: pyvmm itself never imports this."""
import hashlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "driver.c")
CDEF = """
struct bd_ring {
    uint8_t *desc, *avail, *used;
    uint32_t size;
    uint32_t event_idx;
    int notify_fd, irq_fd;
    uint16_t avail_idx, last_used;
    uint64_t kicks, interrupts;
};
struct bd_work {
    uint32_t mode;
    uint32_t depth;
    uint64_t n;
    uint8_t *headers;
    uint8_t *status;
    uint32_t type;
    const uint64_t *sectors;
    int timeout_ms;
    int (*ack)(void);
    uint64_t done, bytes, errors;
    uint32_t base;
    uint64_t spin_ns, spun;
};
long bd_run(struct bd_ring *r, struct bd_work *w);
long bd_prw_loop(int fd, uint8_t *buf, uint64_t len, const uint64_t *offsets, uint64_t n,
                 int write_);
long bd_tap_loop(int fd, uint8_t *buf, uint64_t len, uint64_t n, int write_, uint64_t stride,
                 uint32_t nslots);
long bd_prw_threads(int fd, uint8_t *bufs, uint64_t len, const uint64_t *offsets, uint64_t n,
                    int write_, uint32_t threads);
long bd_pingpong2(long n, int mech, int pin);
"""


def load():
    """(ffi, lib) of the compiled driver."""
    with open(SRC, "rb") as f:
        tag = hashlib.sha256(f.read() + CDEF.encode()).hexdigest()[:12]
    name = f"_bench_driver_{tag}"
    build = os.path.join(HERE, "_build")
    found = [p for p in (os.listdir(build) if os.path.isdir(build) else [])
             if p.startswith(name) and p.endswith(".so")]
    if not found:
        from cffi import FFI
        b = FFI()
        b.cdef(CDEF)
        with open(SRC) as f:
            b.set_source(name, f.read(), extra_compile_args=["-O2", "-std=gnu11"],
                     libraries=["pthread"])
        os.makedirs(build, exist_ok=True)
        b.compile(tmpdir=build, verbose=False)
        found = [p for p in os.listdir(build) if p.startswith(name) and p.endswith(".so")]
    spec = importlib.util.spec_from_file_location(name, os.path.join(build, found[0]))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod.ffi, mod.lib
