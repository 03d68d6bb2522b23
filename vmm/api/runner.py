"""The process side of `pyvmm api` / `pyvmm-firecracker`: start the API
server thread, apply --config-file, wait on the main thread for
InstanceStart, then build and run the Machine exactly as `pyvmm run` does
(same devices, exit statuses, signals), and clean up (socket removed)."""
import json
import logging
import os
import signal
import sys
import time

from vmm.api.controller import Controller
from vmm.api.metrics import Metrics
from vmm.api.server import ApiServer
from vmm.vmconfig import ConfigError

log = logging.getLogger("pyvmm.api")

# --config-file sections -> the API request that configures each (a list
# section is one request per element, keyed by its id field).
SECTIONS = {
    "logger": ("/logger", None),
    "metrics": ("/metrics", None),
    "machine-config": ("/machine-config", None),
    "boot-source": ("/boot-source", None),
    "drives": ("/drives/{}", "drive_id"),
    "network-interfaces": ("/network-interfaces/{}", "iface_id"),
    "vsock": ("/vsock", None),
    "entropy": ("/entropy", None),
    "balloon": ("/balloon", None),
    "mmds-config": ("/mmds/config", None),
    "cpu-config": ("/cpu-config", None),
}


def process_start_times():
    """(wall µs since this process started, CPU µs used so far)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])            # field 22: starttime, in clock ticks since boot
    hz = os.sysconf("SC_CLK_TCK")
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    wall = max(0.0, since_boot - start_ticks / hz)
    return int(wall * 1e6), int(time.process_time() * 1e6)


def apply_config_file(ctl, path):
    """Configure `ctl` from a Firecracker JSON config file; raises ConfigError."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: expected a JSON object")
    for key in doc:
        if key not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown section {key!r}")
    for key, (url, id_field) in SECTIONS.items():   # logger and metrics first
        if key not in doc or doc[key] is None:
            continue
        items = doc[key]
        if id_field is None:
            items = [items]
        elif not isinstance(items, list):
            raise ConfigError(f"config file {path}: {key!r} must be a list")
        for item in items:
            target = url
            if id_field is not None:
                if not isinstance(item, dict) or not isinstance(item.get(id_field), str):
                    raise ConfigError(f"config file {path}: each of {key!r} needs a string "
                                      f"{id_field!r}")
                target = url.format(item[id_field])
            status, obj = ctl.handle("PUT", target, json.dumps(item).encode())
            if status != 204:
                raise ConfigError(f"config file {path}: {key}: {obj['fault_message']}")


class _Signals:
    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def serve(api_sock=None, config_file=None, instance_id="anonymous-instance", log_path=None,
          level=None, metrics_path=None, debug=False, stdin_console=True):
    """Run one microVM under the control API; returns the exit status."""
    ctl = Controller(instance_id, metrics=Metrics())
    logger = {}
    if log_path is not None:
        logger["log_path"] = log_path
    if level is not None:
        logger["level"] = level
    if logger:
        _put(ctl, "/logger", logger, "--log-path/--level")
    if metrics_path is not None:
        _put(ctl, "/metrics", {"metrics_path": metrics_path}, "--metrics-path")
    server = None
    machine = None
    with _Signals() as sig:
        try:
            if api_sock is not None:
                server = ApiServer(api_sock, ctl.handle, tick=ctl.tick)
                server.start()
            ctl.metrics.startup.update(zip(("process_startup_time_us",
                                            "process_startup_time_cpu_us"),
                                           process_start_times()))
            # The VMM's modules (KVM, cffi, devices) load now, after the socket
            # is accepting, while the client configures the VM.
            from vmm import console
            from vmm.machine import STATUS, Machine
            if config_file is not None:
                apply_config_file(ctl, config_file)
                machine = Machine(ctl.config.to_machine_config())
            else:
                while machine is None:
                    if sig.received is not None:
                        return STATUS["signal"]
                    req = ctl.next_start(timeout=0.2)
                    if req is None:
                        continue
                    try:
                        machine = Machine(req.machine_config)
                    except Exception as e:     # reported to the client; keep serving
                        log.debug("InstanceStart failed", exc_info=True)
                        for dev in req.machine_config.devices:
                            dev.close()
                        req.finish(str(e) or type(e).__name__)
                        continue
                    ctl.attach(machine)
                    req.finish()
            ctl.attach(machine)
            if sig.received is not None:
                machine.stop("signal", f"stopped by {signal.Signals(sig.received).name}")
            try:
                if stdin_console:
                    with console.Console(machine):
                        status = machine.run()
                else:
                    status = machine.run()
            finally:
                machine.close()
            if machine.stop_reason not in ("poweroff", "reset", "quit") or debug:
                print(f"pyvmm: {machine.stop_message or machine.stop_reason}", file=sys.stderr)
            return status
        finally:
            if ctl.metrics.configured:
                try:
                    ctl.metrics.flush(machine)
                except Exception:
                    pass
                ctl.metrics.close()
            if server is not None:
                server.close()


def _put(ctl, url, body, what):
    status, obj = ctl.handle("PUT", url, json.dumps(body).encode())
    if status != 204:
        raise ConfigError(f"{what}: {obj['fault_message']}")
