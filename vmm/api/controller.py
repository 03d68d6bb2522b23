"""Turns API requests into configuration changes and Machine operations.

The Controller is called on the API server thread.  Building and running
the VM happen on the main thread (KVM signal handling lives there): on
InstanceStart the controller hands a StartRequest to whoever waits in
`next_start()` (vmm.api.runner) and answers once the machine is built, or
with the build error.  Pre-boot resources are refused after boot and the
other way round, as in Firecracker.
"""
import fcntl
import logging
import os
import queue
import threading

from vmm import vmconfig as vc
from vmm.api import limits, routes
from vmm.api.metrics import Metrics
from vmm.api.schema import ApiError, validate
from vmm.api.version import API_VERSION, APP_NAME, VMM_VERSION
from vmm.api.snapshot import SnapshotMixin

log = logging.getLogger("pyvmm.api")

START_TIMEOUT = 120.0      # seconds the API waits for the main thread to build the VM

LOG_LEVELS = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO,
              "Debug": logging.DEBUG, "Trace": logging.DEBUG, "Off": logging.CRITICAL + 10}

AFTER_BOOT = "the requested operation is not supported after starting the microVM"
BEFORE_BOOT = "the requested operation is not supported before starting the microVM"


class StartRequest:
    def __init__(self, machine_config):
        self.machine_config = machine_config
        self.start_paused = False
        self.error = None
        self.done = threading.Event()

    def finish(self, error=None):
        self.error = error
        self.done.set()


class Controller(SnapshotMixin):
    def __init__(self, instance_id="anonymous-instance", config=None, metrics=None):
        self.instance_id = instance_id
        self.config = config or vc.VmConfig()
        self.machine = None
        self.metrics = metrics or Metrics()
        self._lock = threading.RLock()
        self._starts = queue.Queue()
        self._starting = False
        self._log_handler = None

    # -- state -----------------------------------------------------------------
    @property
    def started(self):
        return self.machine is not None

    @property
    def state(self):
        m = self.machine
        if m is None:
            return "Not started"
        return "Paused" if m.paused else "Running"

    def attach(self, machine):
        """The machine is built and about to run (main thread)."""
        with self._lock:
            self.machine = machine

    def next_start(self, timeout=None):
        """The main thread's side: the next InstanceStart, or None."""
        try:
            return self._starts.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- dispatch ---------------------------------------------------------------
    def handle(self, method, path, body):
        """(status, JSON-able object or None) for one request; never raises."""
        route = None
        try:
            route, (schema, name), params = routes.find(method, path.split("?", 1)[0])
            if schema is None:
                if body:
                    raise ApiError(f"{method} {route.pattern} takes no body")
                args = ()
            else:
                args = (validate(schema, _parse_json(body), partial=method == "PATCH"
                                 and schema == "MachineConfiguration"),)
            with self._lock:
                result = getattr(self, name)(*args, **params)
            self.metrics.count_request(method, route.metric, True)
            return (200, result) if result is not None else (204, None)
        except (ApiError, LookupError, vc.ConfigError) as e:
            if route is not None:
                self.metrics.count_request(method, route.metric, False)
            msg = e.args[0] if e.args else str(e)
            return 400, {"fault_message": str(msg)}
        except Exception as e:      # a pyvmm bug: report it, keep serving
            log.exception("API %s %s failed", method, path)
            return 500, {"fault_message": f"internal error: {type(e).__name__}: {e}"}

    # -- GET ----------------------------------------------------------------------
    def get_instance(self):
        return {"id": self.instance_id, "state": self.state, "vmm_version": VMM_VERSION,
                "app_name": APP_NAME}

    def get_version(self):
        return {"firecracker_version": API_VERSION}

    def get_machine_config(self):
        return dict(vars(self.config.machine))

    def get_vm_config(self):
        return self.config.to_dict()

    # -- pre-boot configuration ----------------------------------------------------
    def _pre_boot(self):
        if self.started or self._starting:
            raise ApiError(AFTER_BOOT)

    def put_machine_config(self, body):
        self._pre_boot()
        m = vc.MachineCfg(**body)
        vc.check_machine(m)
        self.config.machine = m

    def patch_machine_config(self, body):
        self._pre_boot()
        m = vc.MachineCfg(**{**vars(self.config.machine), **body})
        vc.check_machine(m)
        self.config.machine = m

    def put_boot_source(self, body):
        self._pre_boot()
        b = vc.BootSource(**body)
        for what, path in (("kernel", b.kernel_image_path), ("initrd", b.initrd_path)):
            if path is not None and not os.path.isfile(path):
                raise ApiError(f"{what} {path}: no such file")
        self.config.boot_source = b

    def put_drive(self, body, drive_id):
        self._pre_boot()
        _same_id("drive_id", drive_id, body)
        if "path_on_host" not in body:
            raise ApiError("Drive: missing required field `path_on_host` (virtio-block drive)")
        d = vc.Drive(**body)
        if d.is_root_device and any(o.is_root_device and o.drive_id != drive_id
                                    for o in self.config.drives.values()):
            raise ApiError("a root block device already exists")
        if d.partuuid is not None and not d.partuuid.strip():
            raise ApiError("Drive: partuuid must not be empty")
        _check_image(d.path_on_host, d.is_read_only)
        d.rate_limiter = limits.to_api(limits.from_api(d.rate_limiter, "Drive: rate_limiter"))
        if d.rate_limiter is not None and d.io_engine == "Async":
            raise ApiError("Drive: io_engine Async has no rate limiter (use Sync)")
        self.config.drives[drive_id] = d

    def put_net(self, body, iface_id):
        self._pre_boot()
        _same_id("iface_id", iface_id, body)
        n = vc.NetIface(**body)
        from vmm.tap import check_name, parse_mac
        try:
            check_name(n.host_dev_name)
            if n.guest_mac is not None:
                parse_mac(n.guest_mac)
        except ValueError as e:
            raise ApiError(f"NetworkInterface: {e}") from None
        for other in self.config.nets.values():
            if other.iface_id == iface_id:
                continue
            if other.host_dev_name == n.host_dev_name:
                raise ApiError(f"host device {n.host_dev_name} is already used by "
                               f"interface {other.iface_id}")
            if n.guest_mac is not None and other.guest_mac is not None \
                    and other.guest_mac.lower() == n.guest_mac.lower():
                raise ApiError(f"guest MAC {n.guest_mac} is already used by "
                               f"interface {other.iface_id}")
        for k in ("rx_rate_limiter", "tx_rate_limiter"):
            setattr(n, k, limits.to_api(limits.from_api(getattr(n, k), f"NetworkInterface: {k}")))
        self.config.nets[iface_id] = n

    def put_entropy(self, body):
        """A virtio-rng device fed by getrandom(2) (issue #12), optionally rate limited."""
        self._pre_boot()
        lim = limits.from_api(body.get("rate_limiter"), "EntropyDevice: rate_limiter")
        self.config.entropy = {"rate_limiter": limits.to_api(lim)}

    def put_vsock(self, body):
        """Firecracker's PUT /vsock: pre-boot; a second call replaces the first."""
        self._pre_boot()
        v = vc.Vsock(**body)
        from vmm.devices import DeviceSpecError, VsockSpec
        try:
            VsockSpec.from_fields(v.guest_cid, v.uds_path)     # the same checks as --vsock
        except DeviceSpecError as e:
            raise ApiError(f"Vsock: {e}") from None
        self.config.vsock = v

    def put_logger(self, body):
        lg = vc.Logger(**body)
        root = logging.getLogger("pyvmm")
        if lg.log_path is not None:
            try:
                handler = logging.FileHandler(lg.log_path, mode="a")
            except OSError as e:
                raise ApiError(f"cannot open log file {lg.log_path}: {e.strerror}") from None
            parts = ["%(asctime)s", f"[{self.instance_id}]"]
            if lg.show_level:
                parts.append("%(levelname)s")
            if lg.show_log_origin:
                parts.append("%(pathname)s:%(lineno)d")
            handler.setFormatter(logging.Formatter(" ".join(parts) + " %(message)s"))
            if lg.module:
                handler.addFilter(logging.Filter(lg.module))
            if self._log_handler is not None:
                root.removeHandler(self._log_handler)
                self._log_handler.close()
            self._log_handler = handler
            root.addHandler(handler)
        root.setLevel(LOG_LEVELS[lg.level])
        self.config.logger = lg

    def put_metrics(self, body):
        try:
            self.metrics.configure(body["metrics_path"])
        except ValueError as e:
            raise ApiError(str(e)) from None
        except OSError as e:
            raise ApiError(f"cannot open metrics file {body['metrics_path']}: {e.strerror}") from None
        self.config.metrics_path = body["metrics_path"]

    # -- actions ---------------------------------------------------------------------
    def put_action(self, body):
        kind = body["action_type"]
        if kind == "InstanceStart":
            return self._instance_start()
        if kind == "FlushMetrics":
            try:
                self.metrics.flush(self.machine)
            except ValueError as e:
                raise ApiError(str(e)) from None
            return None
        if not self.started:                 # SendCtrlAltDel
            raise ApiError(BEFORE_BOOT)
        from vmm.hw.i8042 import I8042Error
        try:
            self.machine.send_ctrl_alt_del()
        except I8042Error as e:
            raise ApiError(str(e)) from None
        return None

    def _instance_start(self):
        if self.started:
            raise ApiError("InstanceStart: the microVM is already running")
        if self._starting:
            raise ApiError("InstanceStart: the microVM is already starting")
        mc = self.config.to_machine_config()       # ConfigError -> 400
        return self._start_machine(mc)

    def _start_machine(self, mc, start_paused=False, what="InstanceStart"):
        """Hand `mc` to the main thread to build and run (paused if asked:
        a snapshot loaded without resume_vm) and wait for the outcome."""
        req = StartRequest(mc)
        req.start_paused = start_paused
        self._starting = True
        self._lock.release()      # GET / keeps answering while the VM is built
        try:
            self._starts.put(req)
            if not req.done.wait(START_TIMEOUT):
                raise ApiError(f"{what}: the VM was not built within {START_TIMEOUT:g} s")
        finally:
            self._lock.acquire()
            self._starting = False
        if req.error is not None:
            raise ApiError(f"{what}: {req.error}")
        return None

    # -- post-boot ------------------------------------------------------------------
    def patch_vm(self, body):
        if not self.started:
            raise ApiError(BEFORE_BOOT)
        try:
            if body["state"] == "Paused":
                self.machine.pause()
            else:
                self.machine.resume()
        except RuntimeError as e:
            raise ApiError(f"cannot change the VM state: {e}") from None

    def patch_drive(self, body, drive_id):
        if not self.started:
            raise ApiError(BEFORE_BOOT)
        _same_id("drive_id", drive_id, body)
        d = self.config.drives.get(drive_id)
        if d is None:
            raise ApiError(f"no drive with id {drive_id}")
        spec = next((s for s in self.machine.config.devices
                     if getattr(s, "drive_id", None) == drive_id), None)
        dev = spec.device if spec is not None else None
        if dev is None:
            raise ApiError(f"drive {drive_id} is not attached")
        if (body.get("rate_limiter") is not None or body.get("faults") is not None) \
                and getattr(dev, "io_engine", "sync") != "sync":
            raise ApiError(f"drive {drive_id}: io_engine Async has no rate limiter or faults "
                           "(use Sync)")
        if body.get("rate_limiter") is not None:        # applies at once (issue #12)
            icpt = dev.intercept
            lim = limits.patched(icpt and icpt.limiter, body["rate_limiter"],
                                 "PartialDrive: rate_limiter")
            dev.configure(limiter=lim)
            d.rate_limiter = limits.to_api(lim)
        if body.get("faults") is not None:              # pyvmm's extension (issue #15)
            dev.configure(faults=limits.faults_from_api(body["faults"], "disk",
                                                        "PartialDrive: faults"))
        path = body.get("path_on_host")
        if path is None:
            return None
        if getattr(dev, "io_engine", "sync") != "sync":
            # io_uring requests can still be in flight on the old file while paused
            raise ApiError(f"drive {drive_id}: swapping the image of an io_engine Async drive "
                           "is not supported")
        _check_image(path, d.is_read_only, current=dev.path)
        m = self.machine
        was_paused = m.paused
        try:
            m.pause()                  # no request in flight while the file changes
            dev.replace_image(path)
        except RuntimeError as e:
            raise ApiError(f"cannot swap drive {drive_id}: {e}") from None
        except OSError as e:
            raise ApiError(f"cannot swap drive {drive_id}: {e}") from None
        except Exception as e:
            from vmm.virtio.device import VirtioError
            if isinstance(e, VirtioError):
                raise ApiError(str(e)) from None
            raise
        finally:
            if not was_paused:
                m.resume()
        spec.updates = getattr(spec, "updates", 0) + 1
        d.path_on_host = path
        spec.transport.config()        # virtio 1.1 §4.2.2.1 / §4.1.4.3: config changed
        return None

    def patch_net(self, body, iface_id):
        if not self.started:
            raise ApiError(BEFORE_BOOT)
        _same_id("iface_id", iface_id, body)
        n = self.config.nets.get(iface_id)
        if n is None:
            raise ApiError(f"no network interface with id {iface_id}")
        spec = next((s for s in self.machine.config.devices
                     if getattr(s, "iface_id", None) == iface_id), None)
        dev = spec.device if spec is not None else None
        if dev is None:
            raise ApiError(f"network interface {iface_id} is not attached")
        changes = {}
        for k in ("rx_rate_limiter", "tx_rate_limiter"):    # apply at once (issue #12)
            if body.get(k) is not None:
                key = k[:2] + "_limiter"
                icpt = dev.intercept
                changes[key] = limits.patched(icpt and getattr(icpt, key), body[k],
                                              f"PartialNetworkInterface: {k}")
                setattr(n, k, limits.to_api(changes[key]))
        if body.get("faults") is not None:              # pyvmm's extension (issue #15)
            changes["faults"] = limits.faults_from_api(body["faults"], "net",
                                                       "PartialNetworkInterface: faults")
        if changes:
            dev.configure(**changes)
        return None

    # -- periodic work (server thread) ------------------------------------------------
    def tick(self):
        if self.metrics.due():
            try:
                self.metrics.flush(self.machine)
            except Exception:
                log.exception("metrics flush failed")


def _parse_json(body):
    import json
    if not body:
        raise ApiError("the request needs a JSON body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("the request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ApiError(f"malformed JSON body: {e}") from None


def _same_id(name, from_path, body):
    if body.get(name) != from_path:
        raise ApiError(f"the {name} in the path ({from_path}) does not match the one "
                       f"in the body ({body.get(name)})")


def _check_image(path, readonly, current=None):
    """The image exists and no other process holds its lock (as BlkDevice takes it)."""
    if not os.path.exists(path):
        raise ApiError(f"disk image {path}: no such file")
    if current is not None and os.path.samefile(path, current):   # stat only (seccomp "api")
        return
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise ApiError(f"cannot open disk image {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ApiError(f"disk image {path} is in use by another process") from None
    finally:
        os.close(fd)
