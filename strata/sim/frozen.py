"""Fast positional constructors for the frozen, slotted dataclasses the simulator builds by
the million (a ``LoadReport`` per replica poll, a router ``ReplicaState`` per change).

A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``,
which looks the name up again every time; calling the slots' own setters directly builds
the identical object in about half the time. Only classes without ``__post_init__`` (no
validation to skip) and with ``__slots__`` qualify.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def positional_constructor(cls: type[T]) -> Callable[..., T]:
    """``cls(*fields)`` without the frozen ``__init__``; every field must be passed."""
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: needs a dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: has __post_init__, which this would skip")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if len(names) != len(dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: every field must be an init field")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def make({', '.join(names)}):", "    o = _new(_cls)"]
    for i, name in enumerate(names):
        namespace[f"_set{i}"] = cls.__dict__[name].__set__
        lines.append(f"    _set{i}(o, {name})")
    lines.append("    return o")
    exec("\n".join(lines), namespace)  # noqa: S102 - source built from field names only
    make = namespace["make"]
    make.__doc__ = f"{cls.__name__}(*fields), built slot by slot."
    return make  # type: ignore[no-any-return]
