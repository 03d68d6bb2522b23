import sys


def main(argv=None):
    """`pyvmm`: `api` goes straight to the control-API runner (the VMM's
    modules load after its socket is accepting); the rest to vmm.cli."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api"]:
        from vmm.api.cli import api_main
        return api_main(argv[1:])
    from vmm.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
