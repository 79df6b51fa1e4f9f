"""Fast positional constructors for the frozen, slotted dataclasses the simulator builds by
the million (a ``LoadReport`` per replica poll, a router ``ReplicaState`` per change).

A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``,
which looks the name up again every time. Here the fields are stored into an instance of
an unfrozen twin class with the same slots, in the same order (plain attribute stores,
which CPython specialises for slots), and the finished object then takes the frozen class
as its ``__class__``: the layouts are identical, so it is the identical object, built in
a fraction of the time of calling the slots' setters one by one, let alone the ``__init__``.
Only classes without ``__post_init__`` (no validation to skip) and with ``__slots__``
qualify.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def positional_constructor(cls: type[T], fields: str = "") -> Callable[..., T]:
    """``cls(*fields)`` without the frozen ``__init__``; every field must be passed.

    ``fields``, space-separated, names the fields in the order the callers pass them: a
    class whose fields differ then fails here, at import, rather than mixing values up.
    (Callers pass values by position: binding many keywords makes a call much slower.)
    """
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: needs a dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: has __post_init__, which this would skip")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if fields and fields.split() != names:
        raise TypeError(f"{cls.__name__}: fields are {' '.join(names)}, not {fields}")
    if len(names) != len(dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: every field must be an init field")
    if cls.__bases__ != (object,) or tuple(cls.__dict__["__slots__"]) != tuple(names):
        raise TypeError(f"{cls.__name__}: needs slots in field order directly on object")
    if {"o", "_twin", "_cls"} & set(names):
        raise TypeError(f"{cls.__name__}: a field name clashes with the constructor's locals")
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": tuple(names)})
    namespace: dict[str, Any] = {"_twin": twin, "_cls": cls}
    lines = [f"def make({', '.join(names)}):", "    o = _twin()"]
    lines += [f"    o.{name} = {name}" for name in names]
    lines += ["    o.__class__ = _cls", "    return o"]
    exec("\n".join(lines), namespace)  # noqa: S102  # nosec B102 (source built from field names only)
    make = namespace["make"]
    make.__doc__ = f"{cls.__name__}(*fields), built slot by slot."
    return make  # type: ignore[no-any-return]
