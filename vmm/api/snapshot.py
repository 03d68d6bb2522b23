"""/snapshot/create and /snapshot/load (Firecracker's SnapshotCreateParams
and SnapshotLoadParams), as a mixin of the API Controller.

create: only while the VM is paused (PATCH /vm Paused first), Full or Diff
(Diff needs track_dirty_pages in machine-config or enable_diff_snapshots /
track_dirty_pages at load).  load: only before any boot; the memory file is
mapped MAP_PRIVATE (mem_backend File; Uffd is refused); disks and taps are
reopened at the paths the snapshot names (network_overrides give another
tap per iface_id); the VM then runs (resume_vm) or waits paused for
PATCH /vm Resumed.
"""
from vmm.api.schema import ApiError


class SnapshotMixin:
    def put_snapshot_create(self, body):
        from vmm import snapshot
        if not self.started:
            raise ApiError("cannot create a snapshot before the microVM is started")
        try:
            snapshot.create(self.machine, body["snapshot_path"], body["mem_file_path"],
                            body.get("snapshot_type", "Full"))
        except snapshot.SnapshotError as e:
            raise ApiError(f"cannot create the snapshot: {e}") from None
        return None

    def put_snapshot_load(self, body):
        from vmm import snapshot
        from vmm.devices import DeviceSpecError, spec_from_options
        from vmm.machine import MachineConfig
        self._pre_boot()             # "restore into a running VM": refused
        backend = body.get("mem_backend")
        mem_path = body.get("mem_file_path")
        if backend is not None:
            if mem_path is not None:
                raise ApiError("give mem_backend or mem_file_path, not both")
            if backend.get("backend_type") != "File":
                raise ApiError(f"mem_backend backend_type {backend.get('backend_type')!r} is not "
                               "supported (only File)")
            mem_path = backend.get("backend_path")
        if not isinstance(mem_path, str):
            raise ApiError("the memory file is missing: mem_backend {backend_type: File, "
                           "backend_path} is required")
        try:
            restore = snapshot.load(body["snapshot_path"], mem_path)
            taps = {}
            for o in body.get("network_overrides") or []:
                if not isinstance(o, dict) or not {"iface_id", "host_dev_name"} <= set(o):
                    raise ApiError("network_overrides: each needs iface_id and host_dev_name")
                taps[o["iface_id"]] = o["host_dev_name"]
            devices = []
            for opts in restore.device_options():
                override = None
                if opts.get("kind") == "net" and opts.get("id") in taps:
                    override = f"tap={taps.pop(opts['id'])}"
                devices.append(spec_from_options(opts, override))
            if taps:
                raise ApiError(f"network_overrides: no interface {', '.join(taps)} in the snapshot")
        except (snapshot.SnapshotError, DeviceSpecError) as e:
            raise ApiError(f"cannot load the snapshot: {e}") from None
        st = restore.state
        mc = MachineConfig(kernel="", cmdline=st.get("cmdline", ""), mem_size=int(st["mem_size"]),
                           cpus=len(st["vcpus"]), devices=devices, restore=restore,
                           track_dirty_pages=bool(body.get("track_dirty_pages")
                                                  or body.get("enable_diff_snapshots")))
        return self._start_machine(mc, start_paused=not body.get("resume_vm", False),
                                   what="LoadSnapshot")
