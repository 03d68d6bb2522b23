"""The process side of `pyvmm api` / `pyvmm-firecracker`: start the API
server thread, apply --config-file, wait on the main thread for
InstanceStart, then build and run the Machine exactly as `pyvmm run` does
(same devices, exit statuses, signals), and clean up (socket removed).

Start-up order (issue #10's figure, process start -> API socket accepting):
the socket is created first, with little more than argparse, os and socket
loaded; then logging, the controller and the server thread, which answers
the connections queued meanwhile; the VMM's own modules (KVM, cffi,
devices) load last, while the client configures the VM.  Imports are
therefore inside the functions here, on purpose."""
import os
import signal
import sys
import time

from vmm.api.listen import close_unix, listen_unix

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
    import json
    from vmm.vmconfig import ConfigError
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
          level=None, metrics_path=None, debug=False, stdin_console=True, use_seccomp=True):
    """Run one microVM under the control API; returns the exit status.
    `debug`: VMM internals on stderr (the logging set-up is done here, once
    the socket is accepting)."""
    server = None
    machine = None
    start_paused = False
    ctl = None
    early = None
    with _Signals() as sig:
        # clients can connect from here on (the kernel queues them until the
        # server thread below accepts)
        listener = listen_unix(api_sock) if api_sock is not None else None
        # as Firecracker, recorded when the API server is about to serve
        startup = process_start_times()
        try:
            import logging
            logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                                format="pyvmm: %(message)s")
            from vmm.api.controller import Controller
            from vmm.api.metrics import Metrics
            from vmm.api.server import ApiServer
            ctl = Controller(instance_id, metrics=Metrics(*startup))
            logger = {}
            if log_path is not None:
                logger["log_path"] = log_path
            if level is not None:
                logger["level"] = level
            if logger:
                _put(ctl, "/logger", logger, "--log-path/--level")
            if metrics_path is not None:
                _put(ctl, "/metrics", {"metrics_path": metrics_path}, "--metrics-path")
            if listener is not None:
                server = ApiServer(api_sock, ctl.handle, tick=ctl.tick, sock=listener)
                listener = None             # the server owns (and removes) it now
                server.start()
            # While the client configures the VM: the KVM VM is created on a
            # thread (vmm/kvm/early.py) and the VMM's modules (KVM, cffi,
            # devices) load here, so that InstanceStart has little left to do.
            from vmm.kvm.early import EarlyVm
            early = EarlyVm.start()
            from vmm import cli, console  # noqa: F401 (cli: what `pyvmm run` has loaded,
            from vmm.machine import STATUS, Machine  # so nothing imports once confined)
            if use_seccomp:
                # what the API thread imports before its filter goes in at
                # InstanceStart (snapshot, slow path), and every thread's
                # filter built: now, not while the guest's vCPU waits for the
                # GIL (the imports cost ~20 ms there, the builds a few ms each)
                from vmm import seccomp
                seccomp.prepare(None if server is not None else
                                [k for k in seccomp.ALLOW if k != "api"])
            if config_file is not None:
                apply_config_file(ctl, config_file)
                mc = ctl.config.to_machine_config()
                mc.seccomp = use_seccomp
                mc.early = early
                machine = Machine(mc)
            else:
                while machine is None:
                    if sig.received is not None:
                        return STATUS["signal"]
                    req = ctl.next_start(timeout=0.2)
                    if req is None:
                        continue
                    try:
                        req.machine_config.seccomp = use_seccomp
                        req.machine_config.early = early
                        machine = Machine(req.machine_config)
                    except Exception as e:     # reported to the client; keep serving
                        logging.getLogger("pyvmm.api").debug("InstanceStart failed",
                                                             exc_info=True)
                        for dev in req.machine_config.devices:
                            dev.close()
                        early = EarlyVm.start()     # Machine() closed the last one
                        req.finish(str(e) or type(e).__name__)
                        continue
                    start_paused = req.start_paused      # a snapshot loaded without resume_vm
                    if start_paused:
                        machine.pause()                  # "Paused" before the client hears back
                    ctl.attach(machine)
                    req.finish()
            ctl.attach(machine)
            if sig.received is not None:
                machine.stop("signal", f"stopped by {signal.Signals(sig.received).name}")
            if use_seccomp:             # as `pyvmm run`: every thread confined once built
                from vmm import seccomp
                seccomp.enable()
                if server is not None:
                    server.confine("api")
            try:
                if stdin_console:
                    with console.Console(machine):
                        status = machine.run(start_paused=start_paused)
                else:
                    status = machine.run(start_paused=start_paused)
            finally:
                machine.close()
            if machine.stop_reason not in ("poweroff", "reset", "quit") or debug:
                print(f"pyvmm: {machine.stop_message or machine.stop_reason}", file=sys.stderr)
            return status
        finally:
            if ctl is not None and ctl.metrics.configured:
                try:
                    ctl.metrics.flush(machine)
                except Exception:
                    pass
                ctl.metrics.close()
            if server is not None:
                server.close()
            if listener is not None:        # failed before the server took it over
                close_unix(listener, api_sock)
            if early is not None:           # not used (no InstanceStart): release it
                early.close()


def _put(ctl, url, body, what):
    import json
    from vmm.vmconfig import ConfigError
    status, obj = ctl.handle("PUT", url, json.dumps(body).encode())
    if status != 204:
        raise ConfigError(f"{what}: {obj['fault_message']}")
