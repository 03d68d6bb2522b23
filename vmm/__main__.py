import sys


def main(argv=None):
    """`pyvmm`: `api` goes straight to the control-API runner (the VMM's
    modules load after its socket is accepting); the rest to vmm.cli."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api"]:
        from vmm.api.cli import api_main
        return api_main(argv[1:])
    import gc
    if argv[:1] == ["run"] and gc.isenabled():
        # Everything start-up allocates (modules, classes, the VM) lives on:
        # the cyclic collector's passes over it cost ~1 ms of CPU before the
        # guest's first instruction.  vmm.cli turns it back on once the VM
        # is built (issue #16, start-up).
        gc.disable()
        try:
            from vmm.cli import main as cli_main
            return cli_main(argv, gc_paused=True)
        finally:    # an error before the VM was built: on again for an in-process caller
            gc.enable()
    from vmm.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
