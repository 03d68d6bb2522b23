"""Command lines of the control API: `pyvmm api ...` and the
`pyvmm-firecracker` console script, which accepts Firecracker's own flags so
tools that ask for "the firecracker binary" can run pyvmm unchanged."""
import argparse
import sys

from vmm.api.version import API_VERSION, VMM_VERSION
from vmm.clihelp import RawDescriptionHelpFormatter

API_HELP = """Run one microVM controlled through Firecracker's REST API on a Unix socket
(firecracker.yaml v%s). Configure it with PUT /boot-source, /machine-config,
/drives/ID, /network-interfaces/ID, then PUT /actions InstanceStart; or give
--config-file to boot at once.""" % API_VERSION

# Firecracker flags orchestrators pass that have no meaning for pyvmm: accepted
# and ignored (documented in --help).  name -> takes a value
IGNORED_FLAGS = {
    "--boot-timer": False,
    "--seccomp-level": True,
    "--seccomp-filter": True,
    "--start-time-us": True,
    "--start-time-cpu-us": True,
    "--parent-cpu-time-us": True,
    "--http-api-max-payload-size": True,
    "--mmds-size-limit": True,
    "--show-level": False,
    "--show-log-origin": False,
    "--module": True,
    "--snapshot-version": False,
    "--describe-snapshot": True,
}


def add_api_arguments(p):
    p.add_argument("--api-sock", metavar="PATH",
                   help="Unix socket for the API (created 0600, removed on exit; "
                        "default /run/firecracker.socket as Firecracker)")
    p.add_argument("--config-file", metavar="FILE",
                   help="Firecracker JSON configuration (boot-source, machine-config, drives, "
                        "network-interfaces, logger, metrics): boot at once")
    p.add_argument("--no-api", action="store_true",
                   help="no API socket (needs --config-file)")
    p.add_argument("--id", default="anonymous-instance", help="microVM id (GET / reports it)")
    p.add_argument("--log-path", metavar="P", help="write the VMM log to this file or FIFO")
    p.add_argument("--level", metavar="L", help="log level: Error, Warning, Info, Debug, Trace, Off")
    p.add_argument("--metrics-path", metavar="M", help="write JSON metrics lines to this file or FIFO")
    p.add_argument("--no-seccomp", action="store_true",
                   help="do not confine the VMM's threads with seccomp filters once the VM is "
                        "built (as `pyvmm run --no-seccomp`)")
    p.add_argument("--debug", action="store_true", help="VMM internals on stderr")


def run_api(args):
    from vmm.api.runner import serve
    sock = args.api_sock
    if args.no_api:
        sock = None
        if args.config_file is None:
            raise ValueError("--no-api needs --config-file")
    elif sock is None:
        sock = "/run/firecracker.socket"
    return serve(api_sock=sock, config_file=args.config_file, instance_id=args.id,
                 log_path=args.log_path, level=args.level, metrics_path=args.metrics_path,
                 debug=args.debug, use_seccomp=not args.no_seccomp)


def version_text():
    return f"Firecracker v{API_VERSION}\npyvmm {VMM_VERSION} (Firecracker API v{API_VERSION})\n"


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def guarded(fn, args):
    """As vmm.cli.guarded, without importing the VMM (or logging: the runner
    sets it up once the socket is accepting) before the socket is up."""
    try:
        return fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from vmm.cli import error_status
        code = error_status(e)
        if code is None:
            raise
        print(f"pyvmm: {e}", file=sys.stderr)
        return code


STATUS_NOTE = ("exit status: as `pyvmm run` (0 guest powered off or rebooted, 1 VMM error, "
               "2 bad input,\n3 guest panic, 4 guest crash, 130 stopped by a signal)")


def api_main(argv):
    """`pyvmm api ...` (dispatched by vmm.__main__ before vmm.cli is imported:
    the socket is up before the VMM's modules are loaded)."""
    p = Parser(prog="pyvmm api", description=API_HELP, epilog=STATUS_NOTE,
               formatter_class=RawDescriptionHelpFormatter)
    add_api_arguments(p)
    return guarded(run_api, p.parse_args(argv))


def firecracker_main(argv=None):
    """Entry point of `pyvmm-firecracker`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv or "-V" in argv:
        sys.stdout.write(version_text())
        return 0
    kept, ignored = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in IGNORED_FLAGS:
            takes = IGNORED_FLAGS[name] and "=" not in a
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if takes and i + 1 < len(argv)
                                                          else None)
            if name == "--seccomp-level" and value == "0":
                kept.append("--no-seccomp")       # Firecracker's level 0: no filters
            ignored.append(name)
            i += 2 if takes else 1
            continue
        kept.append(a)
        i += 1
    p = Parser(prog="pyvmm-firecracker", description=API_HELP,
               formatter_class=RawDescriptionHelpFormatter,
               epilog="Accepted and ignored (Firecracker flags without meaning for pyvmm): "
                      + ", ".join(IGNORED_FLAGS) + "\n\n" + STATUS_NOTE)
    add_api_arguments(p)
    args = p.parse_args(kept)
    return guarded(run_api, args)


if __name__ == "__main__":
    sys.exit(firecracker_main())
