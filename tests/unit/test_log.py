"""vmm/log.py: the stand-in loggers write what logging.basicConfig's handler
would, without loading logging, and hand over to logging once it is loaded.
Each case runs in a fresh interpreter (pytest itself has loaded logging)."""
import subprocess
import sys

import pytest


def py(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


def test_cli_format_without_loading_logging():
    out, err = py("import sys; from vmm import log; log.configure(False); l = log.getLogger('pyvmm.x'); "
                  "l.debug('hidden %d', 1); l.info('hidden'); l.warning('disk %s: %d', 'a', 2); "
                  "l.error('%(k)s!', {'k': 'v'}); print('logging' in sys.modules, "
                  "l.isEnabledFor(log.DEBUG), l.isEnabledFor(log.WARNING))")
    assert err == "pyvmm: disk a: 2\npyvmm: v!\n"
    assert out.split() == ["False", "False", "True"]


def test_unconfigured_is_logging_last_resort():
    _, err = py("from vmm import log; l = log.getLogger('pyvmm'); l.info('no'); l.warning('yes %s', 1)")
    assert err == "yes 1\n"


def test_exc_info_without_traceback_loaded_is_one_line():
    _, err = py("from vmm import log; log.configure(False); l = log.getLogger('pyvmm')\n"
                "try:\n    1/0\nexcept ZeroDivisionError:\n    l.exception('failed')")
    assert err == "pyvmm: failed\nZeroDivisionError: division by zero\n"


@pytest.mark.parametrize("debug", [False, True])
def test_hands_over_to_logging_once_loaded(debug):
    """--debug loads logging at once; otherwise a module that loads it (a
    device, the API) gets the CLI's format and level when the stand-in (or
    settle()) next looks."""
    out, err = py("import sys; from vmm import log; "
                  f"log.configure({debug}); l = log.getLogger('pyvmm.y'); "
                  "import logging; log.settle(); l.debug('dbg'); logging.getLogger('pyvmm.z').warning('w'); "
                  "print(logging.getLogger().level, l.getEffectiveLevel())")
    assert err == ("pyvmm: dbg\n" if debug else "") + "pyvmm: w\n"
    assert out.split() == (["10", "10"] if debug else ["30", "30"])


def test_record_captured_by_logging_when_loaded(caplog):
    from vmm import log
    caplog.set_level(log.DEBUG, logger="pyvmm")
    log.getLogger("pyvmm.t").debug("seen %s", "here")
    assert [r.getMessage() for r in caplog.records] == ["seen here"]


def test_record_origin_is_the_caller(caplog):
    """With logging loaded, a record names the line that logged (the API's
    show_log_origin prints it), not vmm/log.py."""
    from vmm import log
    caplog.set_level(log.DEBUG, logger="pyvmm")
    lg = log.getLogger("pyvmm.t")
    lg.warning("a")
    lg.log(log.WARNING, "b")
    assert [(r.filename, r.funcName) for r in caplog.records] == [
        ("test_log.py", "test_record_origin_is_the_caller")] * 2
