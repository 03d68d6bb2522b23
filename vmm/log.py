"""Loggers for the modules of `pyvmm run`'s path that load `logging` only
when a record is to be written.

`logging` (with traceback, linecache, tokenize, weakref, string and re) is
about 7 ms of CPU at every start, and a plain run writes no record at all
(issue #16, start-up).  getLogger() here returns a stand-in with logging's
calls; it asks `logging` itself as soon as that module is loaded (by a test,
the API, a device module, or load() below), so levels, handlers and caplog
work as before.  Until then nothing has configured logging but configure()
(the CLI: 'pyvmm: message' on stderr, DEBUG with --debug else WARNING, as
logging.basicConfig did) and the stand-in writes a record that passes the
level itself, in that format (or logging's last-resort one: the message
alone, WARNING and above, if configure() was not called).  It never imports
on its own: a first import on a thread confined by seccomp ends the VMM
(SIGSYS), so a record from there must not need one.

    from vmm.log import getLogger
    log = getLogger("pyvmm")
    log.debug("...")                    # nothing loaded, nothing written
    configure(debug=False)              # the CLI's settings, applied when logging loads
    load()                              # import logging now and apply them
"""
import sys

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

FORMAT = "pyvmm: %(message)s"
_pending = None         # configure()'s basicConfig arguments, until logging is loaded


def configure(debug):
    """The CLI's logging: 'pyvmm: message' lines on stderr, DEBUG and up with
    --debug (logging loads now), else WARNING and up (applied whenever
    logging loads: load())."""
    global _pending
    _pending = {"level": DEBUG if debug else WARNING, "format": FORMAT}
    if debug or "logging" in sys.modules:
        load()


def load():
    """Import logging and apply configure()'s settings to it (once); returns
    the module."""
    global _pending
    import logging
    if _pending is not None:
        kw, _pending = _pending, None
        logging.basicConfig(**kw)
    return logging


def settle():
    """load() if something has imported logging meanwhile (a device or the
    API's modules), so its records get configure()'s format too."""
    if "logging" in sys.modules:
        load()


class Logger:
    """logging.getLogger(name), once logging is loaded; see the module doc."""

    def __init__(self, name):
        self.name = name
        self._logger = None

    def _real(self):
        lg = self._logger
        if lg is None:
            lg = self._logger = load().getLogger(self.name)
        return lg

    def _loaded(self):
        return self._logger is not None or "logging" in sys.modules

    def isEnabledFor(self, level):
        if self._loaded():
            return self._real().isEnabledFor(level)
        return level >= (WARNING if _pending is None else _pending["level"])

    def _emit(self, level, msg, args, kw):
        if self._loaded():
            # the record's origin (file, line, function) is our caller's caller
            kw["stacklevel"] = kw.get("stacklevel", 1) + 2
            self._real().log(level, msg, *args, **kw)
        elif self.isEnabledFor(level):
            self._write(msg, args, kw.get("exc_info"))

    def log(self, level, msg, *args, **kw):
        self._emit(level, msg, args, kw)

    def debug(self, msg, *args, **kw):
        self._emit(DEBUG, msg, args, kw)

    def info(self, msg, *args, **kw):
        self._emit(INFO, msg, args, kw)

    def warning(self, msg, *args, **kw):
        self._emit(WARNING, msg, args, kw)

    def error(self, msg, *args, **kw):
        self._emit(ERROR, msg, args, kw)

    def critical(self, msg, *args, **kw):
        self._emit(CRITICAL, msg, args, kw)

    def exception(self, msg, *args, exc_info=True, **kw):
        kw["exc_info"] = exc_info
        self._emit(ERROR, msg, args, kw)

    def __getattr__(self, name):        # anything else (handlers, setLevel...): the real one
        return getattr(self._real(), name)

    @staticmethod
    def _write(msg, args, exc_info):
        """What basicConfig's StreamHandler would write (logging not loaded).
        Like logging, a record that cannot be formatted (a bad %-format, a
        failing __str__) is reported on stderr, never raised to the caller:
        a log call must not end the VMM."""
        if len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]              # logging's "%(name)s" with one mapping
        fmt = FORMAT if _pending is not None else "%(message)s"
        try:
            text = str(msg) % args if args else str(msg)
            if exc_info:                # normalised as Logger._log does
                if isinstance(exc_info, BaseException):
                    exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
                elif not isinstance(exc_info, tuple):
                    exc_info = sys.exc_info()
                if exc_info[0] is not None:
                    tb = sys.modules.get("traceback")    # loaded only by a debug run: no import here
                    text += "\n" + ("".join(tb.format_exception(*exc_info)).rstrip("\n") if tb
                                    else f"{exc_info[0].__name__}: {exc_info[1]}")
            line = fmt % {"message": text} + "\n"
        except Exception as e:          # logging.Handler.handleError's report, without traceback
            line = (f"--- Logging error ---\n{type(e).__name__}: {e}\n"
                    f"Message: {msg!r}\nArguments: {args!r}\n")
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except Exception:               # stderr closed or full: as logging, nothing more to do
            pass


def getLogger(name):
    return Logger(name)
