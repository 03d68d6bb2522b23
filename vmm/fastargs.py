"""Command lines parsed without argparse, when that gives argparse's answer.

Loading argparse (with re, enum, gettext and locale) and building pyvmm's
parsers cost about 6 ms of CPU at every `pyvmm run`, a tenth of its way to
the guest's first instruction (issue #16, start-up).  The options are still
declared once, with argparse's add_argument() calls: they are replayed here
on a Recorder, and parse() reads a command line made only of those options,
spelled out in full, with plain values.  Anything else — help, an
abbreviation, a value starting with '-', a bad value, an unknown option, a
kind of option this module does not know — returns None, and the caller
hands the command line to argparse, which gives its usual answer or error.
tests/unit/test_fastargs.py checks the two agree.

    rec = Recorder()
    add_run_arguments(rec)              # the calls that build the argparse parser
    ns = parse(rec, argv)               # a SimpleNamespace, or None: use argparse
"""
import types

SUPPORTED_ACTIONS = (None, "store", "append", "store_true")
SUPPORTED_KEYS = {"action", "type", "default", "choices", "nargs", "const", "metavar", "help",
                  "dest"}


class Recorder:
    """Stands in for an argparse parser: keeps each add_argument() call."""

    def __init__(self):
        self.options = {}       # option string -> spec dict
        self.specs = []
        self.supported = True   # False if a call uses what parse() does not model

    def add_argument(self, *names, **kw):
        if (not names or not all(n.startswith("--") for n in names)
                or set(kw) - SUPPORTED_KEYS or kw.get("action") not in SUPPORTED_ACTIONS
                or kw.get("nargs") not in (None, "?")
                or (kw.get("nargs") == "?" and kw.get("action") not in (None, "store"))):
            self.supported = False
            return
        spec = dict(kw)
        spec.setdefault("dest", names[0][2:].replace("-", "_"))
        action = spec.get("action") or "store"
        spec["action"] = action
        if "default" not in spec:
            spec["default"] = False if action == "store_true" else None
        self.specs.append(spec)
        for n in names:
            self.options[n] = spec


def _value(spec, text):
    """argparse's type conversion and choices check; raises ValueError if
    argparse would refuse it (then argparse is asked for its error)."""
    conv = spec.get("type")
    if conv is not None:
        try:
            value = conv(text)
        except Exception:
            raise ValueError(text) from None
    else:
        value = text
    if "choices" in spec and value not in spec["choices"]:
        raise ValueError(text)
    return value


def parse(rec, argv, **fixed):
    """The namespace argparse would make of `argv` (with `fixed` attributes,
    e.g. command="run"), or None when argparse must decide."""
    if not rec.supported:
        return None
    values = {}
    for spec in rec.specs:
        d = spec["default"]
        if isinstance(d, list):
            d = list(d)     # argparse's append copies the default list too
        values[spec["dest"]] = d
    i = 0
    try:
        while i < len(argv):
            tok = argv[i]
            i += 1
            name, eq, explicit = tok.partition("=")
            spec = rec.options.get(name)
            if spec is None or not tok.startswith("--"):
                return None
            action, dest = spec["action"], spec["dest"]
            if action == "store_true":
                if eq:
                    return None
                values[dest] = True
                continue
            if eq:
                text = explicit
            elif i < len(argv) and not argv[i].startswith("-"):
                text = argv[i]
                i += 1
            elif spec.get("nargs") == "?":
                values[dest] = spec.get("const")
                continue
            else:
                return None
            value = _value(spec, text)
            if action == "append":
                if values[dest] is None:      # argparse's append starts a list over a None default
                    values[dest] = []
                values[dest].append(value)
            else:
                values[dest] = value
    except ValueError:
        return None
    for spec in rec.specs:       # argparse converts string defaults with `type` at the end
        d = spec["default"]
        if isinstance(d, str) and values[spec["dest"]] is d and spec.get("type") is not None:
            try:
                values[spec["dest"]] = _value(spec, d)
            except ValueError:
                return None
    values.update(fixed)
    return types.SimpleNamespace(**values)
