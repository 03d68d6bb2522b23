"""vmm/fastargs.py: `pyvmm run`'s command line read without argparse gives
argparse's namespace, or gives up (None) and leaves it to argparse."""
import sys

import pytest

from vmm import cli, fastargs

ARGV = [
    [],
    ["--kernel", "k", "--mem", "64M"],
    ["--kernel=k", "--mem=2G", "--cpus", "2", "--cpu-template", "host"],
    ["--kernel", "k", "--initrd", "i", "--cmdline", "console=ttyS0 quiet", "--serial", "file:/tmp/x"],
    ["--kernel", "k", "--cmdline", "", "--timeout", "1.5", "--debug", "--no-seccomp"],
    ["--drive", "file=a", "--drive", "file=b,readonly=on", "--net", "tap=t0", "--vsock", "cid=3,uds=/s"],
    ["--rng"], ["--rng", "--kernel", "k"], ["--rng", "bw=1M:100"], ["--rng=ops=5:10"], ["--rng="],
    ["--mem", "512", "--mem", "1g"], ["--mem", "64MiB"], ["--mem", " 64M"],
    ["--timeout", "inf"], ["--timeout", "1e-3"], ["--cpus", "010"],
    ["--trace-exits", "f", "--track-dirty-pages", "--api-sock", "/a.sock"],
    ["--cmdline=a=b c=d"], ["--kernel", "k", "--debug", "--debug"],
]
GIVE_UP = [
    ["--help"], ["-h"], ["--kern", "k"], ["--kernel"], ["--kernel", "-x"], ["--cmdline", "-1"],
    ["--mem", "lots"], ["--mem", "0x10"], ["--cpus", "x"], ["--cpu-template", "fancy"], ["--debug=1"],
    ["stray"], ["--", "--kernel", "k"], ["--rng", "-5"], ["--frobnicate"], ["-"],
]


def argparse_ns(argv):
    return vars(cli.build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize("argv", ARGV, ids=lambda a: " ".join(a) or "none")
def test_same_namespace_as_argparse(argv):
    ns = cli.fast_parse(["run", *argv])
    assert ns is not None
    assert vars(ns) == argparse_ns(argv)


@pytest.mark.parametrize("argv", GIVE_UP, ids=" ".join)
def test_gives_up_where_argparse_decides(argv):
    assert cli.fast_parse(["run", *argv]) is None


def test_only_run_is_read():
    for argv in (["api"], ["restore", "--snapshot", "s"], ["--version"], [], ["snapshot"]):
        assert cli.fast_parse(argv) is None


def test_every_run_option_is_modelled():
    """An option kind fastargs does not know (e.g. action="count") would send
    every `pyvmm run` through argparse again: model it or accept the cost."""
    rec = fastargs.Recorder()
    cli.add_run_arguments(rec)
    assert rec.supported
    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    names = {s for a in run._actions for s in a.option_strings} - {"-h", "--help"}
    assert names == set(rec.options)


def test_unknown_kind_gives_up():
    rec = fastargs.Recorder()
    rec.add_argument("--verbose", action="count")
    assert not rec.supported and fastargs.parse(rec, []) is None
