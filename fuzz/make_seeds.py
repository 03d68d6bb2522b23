"""Write seed inputs for the Python fuzz targets (fuzz/corpus/<target>/).

    python3 fuzz/make_seeds.py

Each seed starts the way fuzzlib.drive() reads it (device/transport choices,
then ops): a mock-driver initialization with every offered feature, then a
run of random actions from a fixed pseudo-random generator, so the fuzzer
starts from a live device rather than from a reset one.
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = [f[:-3] for f in os.listdir(os.path.join(HERE, "targets"))
           if f.startswith(("mmio_", "pci_"))]
INIT = bytes([3]) + b"\xff" * 8 + bytes([2, 0])     # op 3: features all ones, queue size 256


def seed(rng, with_init=True):
    head = bytes([rng.randrange(4), rng.randrange(2), 1])   # queue size, readonly/mrg, native
    ops = b""
    for _ in range(rng.randrange(4, 24)):
        op = rng.choice([4, 4, 5, 0, 2, 6, 7, 8, 9])
        ops += bytes([op]) + bytes(rng.randrange(256) for _ in range(rng.randrange(4, 12)))
    return head + (INIT if with_init else b"") + ops


def blk_engines_seeds():
    """blk_engines reads a 9-byte header then RAM from gpa 0: the native blk
    seeds (native/fuzz/make_seeds.py) converted, regions 0 and 1 in place."""
    src = os.path.join(os.path.dirname(HERE), "native", "fuzz", "corpus", "blk")
    d = os.path.join(HERE, "corpus", "blk_engines")
    os.makedirs(d, exist_ok=True)
    for name in sorted(os.listdir(src)):
        raw = open(os.path.join(src, name), "rb").read()
        hdr, ram = raw[:32], raw[32:]
        out = hdr[:8] + bytes([2]) + ram[:0x1000].ljust(0x3000, b"\0") + ram[0x1000:0x2000]
        with open(os.path.join(d, name), "wb") as f:
            f.write(out.rstrip(b"\0"))


REQUESTS = [
    ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}),
    ("PATCH", "/machine-config", {"mem_size_mib": 128, "track_dirty_pages": True}),
    ("PUT", "/boot-source", {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}),
    ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/r.img",
                               "is_root_device": True, "is_read_only": False}),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                         "guest_mac": "06:00:ac:10:00:02"}),
    ("PUT", "/logger", {"log_path": "/x/api.log", "level": "debug", "show_level": True}),
    ("PUT", "/metrics", {"metrics_path": "/x/metrics.log"}),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("GET", "/", None), ("GET", "/vm/config", None), ("GET", "/machine-config", None),
]


def api_seeds():
    import json
    methods = ("GET", "PUT", "PATCH", "POST", "DELETE", "put", "")
    sys_path = os.path.join(HERE, "targets")
    import sys
    sys.path.insert(0, sys_path)
    paths = __import__("api_requests").PATHS
    for name in ("api_http", "api_requests"):
        os.makedirs(os.path.join(HERE, "corpus", name), exist_ok=True)
    for i in range(0, len(REQUESTS), 3):
        batch = REQUESTS[i:i + 3]
        stream, enc = b"", b""
        for method, path, body in batch:
            raw = json.dumps(body).encode() if body is not None else b""
            stream += (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
                       f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw
            enc += bytes([methods.index(method), paths.index(path)]) + len(raw).to_bytes(2, "little") + raw
        with open(os.path.join(HERE, "corpus", "api_http", f"seed-{i // 3}"), "wb") as f:
            f.write(bytes([3 + i]) + stream)
        with open(os.path.join(HERE, "corpus", "api_requests", f"seed-{i // 3}"), "wb") as f:
            f.write(enc)


def main():
    blk_engines_seeds()
    api_seeds()
    for t in TARGETS:
        d = os.path.join(HERE, "corpus", t)
        os.makedirs(d, exist_ok=True)
        rng = random.Random(t)
        for i in range(6):
            with open(os.path.join(d, f"seed-{i}"), "wb") as f:
                f.write(seed(rng, with_init=i != 5))


if __name__ == "__main__":
    main()
