"""Plain data records declared like dataclasses, without their start-up cost.

    class Drive(Record):
        drive_id: str
        path_on_host: str
        is_read_only: bool = False
        tags: dict = Factory(dict)      # a fresh dict per record

    Drive("rootfs", "/img")             # positional or keyword, as a dataclass
    vars(d), d == other, repr(d)        # plain attributes; equality by fields

Why not dataclasses: `import dataclasses` pulls in inspect, ast, dis and
tokenize, and each @dataclass compiles its methods with exec(); on the path
from process start to an accepting API socket or a running guest that was
more time than all of pyvmm's own modules.  Here the fields are read once
from the class body's annotations (which stay unevaluated strings where the
module uses `from __future__ import annotations`, so no typing import is
needed) and one generic __init__ serves every record.
"""

_REQUIRED = object()


class Factory:
    """A default made fresh for each record (dataclasses' default_factory)."""
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


class Record:
    _fields = ()            # ((name, default or _REQUIRED or Factory), ...) in order

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        fields = dict(cls._fields)             # inherited fields first
        for name in cls.__dict__.get("__annotations__", {}):
            default = cls.__dict__.get(name, _REQUIRED)
            fields[name] = default
            if isinstance(default, Factory):   # not a class attribute (as dataclasses)
                delattr(cls, name)
        seen_default = False
        for name, default in fields.items():
            if default is _REQUIRED and seen_default:
                raise TypeError(f"{cls.__name__}: required field {name!r} after a default")
            seen_default = seen_default or default is not _REQUIRED
        cls._fields = tuple(fields.items())

    def __init__(self, *args, **kw):
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes at most {len(fields)} "
                            f"positional arguments ({len(args)} given)")
        for (name, default), value in zip(fields, args):
            if name in kw:
                raise TypeError(f"{type(self).__name__}() got multiple values for {name!r}")
            kw[name] = value
        for name, default in fields:
            if name in kw:
                setattr(self, name, kw.pop(name))
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__}() missing required argument {name!r}")
            else:
                setattr(self, name, default.make() if isinstance(default, Factory) else default)
        if kw:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{next(iter(kw))!r}")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n, _ in self._fields)

    __hash__ = None         # mutable, as a dataclass without frozen=True

    def __repr__(self):
        return (f"{type(self).__name__}("
                + ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._fields) + ")")
