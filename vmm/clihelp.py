"""argparse help formatters that find the terminal width without shutil.

argparse's formatters call shutil.get_terminal_size(), and argparse builds
one for every add_argument(), so every `pyvmm` start imported shutil (with
bz2, lzma and zlib): about 2 ms of a start-up whose goal is QEMU's.  The
width computed here is the same (COLUMNS, else the terminal's, else 80).
"""
import argparse
import os
import sys


def terminal_width(fallback=80):
    """shutil.get_terminal_size().columns, without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or fallback


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_width() - 2 if width is None else width)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_width() - 2 if width is None else width)
