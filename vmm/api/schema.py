"""Firecracker's API resources (firecracker.yaml v1.14.1, `definitions:`):
their fields, JSON types and which are required, and a validator that turns
a request body into a dict or raises ApiError with a one-line reason.

Like Firecracker (serde with deny_unknown_fields) an unknown field is an
error; an optional field given as null counts as absent.  Fields that belong
to features another issue implements (rate limiters, vhost-user) are
recognised and refused with a clear message rather than silently ignored.
"""
from vmm.api.version import API_VERSION  # noqa: F401 (the firecracker.yaml read; re-exported)


class ApiError(Exception):
    """A bad request: HTTP 400 with {"fault_message": str(self)}."""


class F:
    """One field of a resource.  A plain class, not a dataclass: this module
    loads before the API socket accepts, and dataclasses (with inspect) cost
    more start-up time than everything else here."""
    __slots__ = ("type", "required", "enum", "unsupported", "minimum", "ci")

    def __init__(self, type, required=False, enum=None, unsupported=None, minimum=None,
                 ci=False):
        self.type = type                # str, int, bool, dict, list
        self.required = required
        self.enum = enum                # tuple of allowed values, or None
        self.unsupported = unsupported  # reason, if pyvmm refuses the field for now
        self.minimum = minimum
        self.ci = ci                    # enum compared case-insensitively


SCHEMAS = {
    "BootSource": {
        "kernel_image_path": F(str, required=True),
        "initrd_path": F(str),
        "boot_args": F(str),
    },
    "MachineConfiguration": {
        "vcpu_count": F(int, required=True, minimum=1),
        "mem_size_mib": F(int, required=True, minimum=1),
        "smt": F(bool),
        "track_dirty_pages": F(bool),
        "cpu_template": F(str, enum=("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")),
        "huge_pages": F(str, enum=("None", "2M")),
    },
    "Drive": {
        "drive_id": F(str, required=True),
        "is_root_device": F(bool, required=True),
        "path_on_host": F(str),
        "is_read_only": F(bool),
        "partuuid": F(str),
        "cache_type": F(str, enum=("Unsafe", "Writeback")),
        "io_engine": F(str, enum=("Sync", "Async")),
        "rate_limiter": F(dict),
        "socket": F(str, unsupported="vhost-user-block drives are not supported by pyvmm"),
    },
    "PartialDrive": {
        "drive_id": F(str, required=True),
        "path_on_host": F(str),
        "rate_limiter": F(dict),
        "faults": F(str),           # pyvmm: fault SPEC (vmm/virtio/faults.py), "" = none
    },
    "NetworkInterface": {
        "iface_id": F(str, required=True),
        "host_dev_name": F(str, required=True),
        "guest_mac": F(str),
        "rx_rate_limiter": F(dict),
        "tx_rate_limiter": F(dict),
    },
    "PartialNetworkInterface": {
        "iface_id": F(str, required=True),
        "rx_rate_limiter": F(dict),
        "tx_rate_limiter": F(dict),
        "faults": F(str),           # pyvmm: fault SPEC, e.g. "link=down", "" = none
    },
    "EntropyDevice": {
        "rate_limiter": F(dict),
    },
    "InstanceActionInfo": {
        "action_type": F(str, required=True,
                         enum=("FlushMetrics", "InstanceStart", "SendCtrlAltDel")),
    },
    "Vm": {
        "state": F(str, required=True, enum=("Paused", "Resumed")),
    },
    "SnapshotCreateParams": {
        "snapshot_type": F(str, enum=("Full", "Diff")),
        "snapshot_path": F(str, required=True),
        "mem_file_path": F(str, required=True),
    },
    "SnapshotLoadParams": {
        "snapshot_path": F(str, required=True),
        "mem_file_path": F(str),
        "mem_backend": F(dict),
        "enable_diff_snapshots": F(bool),
        "track_dirty_pages": F(bool),
        "resume_vm": F(bool),
        "network_overrides": F(list),
    },
    "Logger": {
        "log_path": F(str),
        "level": F(str, enum=("Error", "Warning", "Info", "Debug", "Trace", "Off"), ci=True),
        "show_level": F(bool),
        "show_log_origin": F(bool),
        "module": F(str),
    },
    "Metrics": {
        "metrics_path": F(str, required=True),
    },
    "Vsock": {
        "guest_cid": F(int, required=True, minimum=3),
        "uds_path": F(str, required=True),
        "vsock_id": F(str),             # deprecated in Firecracker, accepted and kept
    },
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object",
               list: "an array"}


def check_type(value, ftype):
    if ftype is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, ftype)


def validate(schema, body, partial=False):
    """Check `body` (parsed JSON) against SCHEMAS[schema]; returns a new dict
    without the null fields.  `partial` skips the required check (PATCH of
    machine-config, where every field is optional)."""
    fields = SCHEMAS[schema]
    if not isinstance(body, dict):
        raise ApiError(f"{schema}: the request body must be a JSON object")
    out = {}
    for name, value in body.items():
        spec = fields.get(name)
        if spec is None:
            raise ApiError(f"{schema}: unknown field `{name}` (expected one of: "
                           f"{', '.join(fields)})")
        if value is None:
            continue
        if spec.unsupported:
            raise ApiError(f"{schema}: `{name}`: {spec.unsupported}")
        if not check_type(value, spec.type):
            raise ApiError(f"{schema}: `{name}` must be {_TYPE_NAMES[spec.type]}")
        if spec.enum is not None:
            match = [e for e in spec.enum if (e.lower() == value.lower() if spec.ci else e == value)]
            if not match:
                raise ApiError(f"{schema}: `{name}` must be one of {', '.join(spec.enum)} "
                               f"(got {value!r})")
            value = match[0]
        if spec.minimum is not None and value < spec.minimum:
            raise ApiError(f"{schema}: `{name}` must be at least {spec.minimum}")
        if spec.type is int and value > 1 << 53:
            raise ApiError(f"{schema}: `{name}` is too large")
        out[name] = value
    if not partial:
        missing = [n for n, s in fields.items() if s.required and n not in out]
        if missing:
            raise ApiError(f"{schema}: missing required field `{missing[0]}`")
    return out
