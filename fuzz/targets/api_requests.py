"""Fuzz target: the API's request handling below HTTP (vmm/api/routes.py,
schema.py, controller.py, vmconfig.py): a method, a path and a JSON body per
request, several requests per input against one pre-boot VMM, so sequences
(machine-config then drives then InstanceStart...) are reached.  Every
answer must be 200/204 or a 400 with a one-line fault_message (apilib)."""
from apilib import SandboxController, check_answer
from fuzzlib import Provider

METHODS = ("GET", "PUT", "PATCH", "POST", "DELETE", "put", "")
PATHS = ("/", "/version", "/machine-config", "/boot-source", "/drives/rootfs", "/drives/",
         "/network-interfaces/eth0", "/actions", "/vm", "/vm/config", "/logger", "/metrics",
         "/snapshot/create", "/vsock", "/entropy", "/mmds", "/cpu-config", "/drives/a/b")


def one_input(data):
    p = Provider(data)
    c = SandboxController()
    try:
        for _ in range(8):
            if not p.left:
                break
            method = p.pick(METHODS)
            sel = p.byte()
            if sel < 200:
                path = PATHS[sel % len(PATHS)]
            else:   # a fuzzed path, query string and all
                path = "/" + p.bytes(p.byte() % 32).decode("latin-1")
            body = p.bytes(p.int(2) % 512)
            status, obj = c.handle(method, path, body)
            check_answer(status, obj)
    finally:
        c.close()
