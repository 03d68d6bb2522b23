"""The routing table: one entry per resource of Firecracker's API.

Each Route names, per HTTP method, the body schema (vmm.api.schema.SCHEMAS,
or None for no body) and the Controller method that serves it.  `{name}` in
a pattern matches one path segment and is passed as a keyword argument.
`metric` is the resource's name in Firecracker's *_api_requests metrics.

To add a resource (say /vsock), add a Route here and the method on the
Controller (or a mixin); until then `unsupported` answers 400 with the reason.
"""


class Route:
    """A plain class, not a dataclass: see schema.F."""
    __slots__ = ("pattern", "methods", "metric", "unsupported")

    def __init__(self, pattern, methods=None, metric="", unsupported=None):
        self.pattern = pattern
        self.methods = methods or {}    # method -> (schema name or None, handler name)
        self.metric = metric
        self.unsupported = unsupported

    def match(self, path):
        """{param: value} if `path` matches, else None."""
        want = self.pattern.strip("/").split("/")
        got = path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params = {}
        for w, g in zip(want, got):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


ROUTES = [
    Route("/", {"GET": (None, "get_instance")}, "instance_info"),
    Route("/version", {"GET": (None, "get_version")}, "vmm_version"),
    Route("/machine-config", {"GET": (None, "get_machine_config"),
                              "PUT": ("MachineConfiguration", "put_machine_config"),
                              "PATCH": ("MachineConfiguration", "patch_machine_config")},
          "machine_cfg"),
    Route("/boot-source", {"PUT": ("BootSource", "put_boot_source")}, "boot_source"),
    Route("/drives/{drive_id}", {"PUT": ("Drive", "put_drive"),
                                 "PATCH": ("PartialDrive", "patch_drive")}, "drive"),
    Route("/network-interfaces/{iface_id}",
          {"PUT": ("NetworkInterface", "put_net"),
           "PATCH": ("PartialNetworkInterface", "patch_net")}, "network"),
    Route("/actions", {"PUT": ("InstanceActionInfo", "put_action")}, "actions"),
    Route("/vm", {"PATCH": ("Vm", "patch_vm")}, "vm"),
    Route("/vm/config", {"GET": (None, "get_vm_config")}, "vm_config"),
    Route("/logger", {"PUT": ("Logger", "put_logger")}, "logger"),
    Route("/metrics", {"PUT": ("Metrics", "put_metrics")}, "metrics"),
    Route("/entropy", {"PUT": ("EntropyDevice", "put_entropy")}, "entropy"),
    Route("/vsock", {"PUT": ("Vsock", "put_vsock")}, "vsock"),
    # Resources other issues implement: refused plainly until then.
    Route("/snapshot/create", {"PUT": ("SnapshotCreateParams", "put_snapshot_create")},
          "create_snapshot"),
    Route("/snapshot/load", {"PUT": ("SnapshotLoadParams", "put_snapshot_load")},
          "load_snapshot"),
    Route("/entropy", unsupported="the entropy device is not supported yet (issue #12)"),
    Route("/balloon", unsupported="the balloon device is not supported by pyvmm"),
    Route("/balloon/statistics", unsupported="the balloon device is not supported by pyvmm"),
    Route("/mmds", unsupported="MMDS is not supported by pyvmm"),
    Route("/mmds/config", unsupported="MMDS is not supported by pyvmm"),
    Route("/cpu-config", unsupported="custom CPU templates are not supported by pyvmm "
                                     "(use machine-config cpu_template)"),
]


def find(method, path):
    """(route, (schema, handler name), params) or raises LookupError(reason)."""
    for route in ROUTES:
        params = route.match(path)
        if params is None:
            continue
        if route.unsupported:
            raise LookupError(f"{path}: {route.unsupported}")
        if method not in route.methods:
            raise LookupError(f"invalid request method {method} for {route.pattern} "
                              f"(allowed: {', '.join(route.methods)})")
        return route, route.methods[method], params
    raise LookupError(f"invalid request method and/or path: {method} {path}")
