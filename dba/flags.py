"""Command-line flags, each declared once: a table of `Flag`s per group, its argparse declaration
and the values read back. Framework-free, so the tables can live beside what they configure:
the KV-cache flags in dba/kvspec.py, the self-opt flags in dba/self_opt.py, the training flags in
train/args.py, and every command that takes a group adds the same table.

A flag's default is the default of the dataclass field it fills (`field_default`), so a default
is written once, in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

KINDS = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Flag:
    name: str  # the argparse dest, v29's attribute name; the flag is --name-with-dashes
    kind: str  # int | float | str | bool (a switch, store_true)
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    group: str = ""  # the configuration group that holds it
    field: str | None = None  # its field in that group (default: the flag's name)

    @property
    def attr(self) -> str:
        return self.field or self.name

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (a tuple default as 'a,b,c', the way the flag
    is typed)."""
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        raise ValueError(f"{cls.__name__}.{name} has no default")
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def add_flags(parser: Any, flags: Iterable[Flag], *, suppress: bool = False, default_in_help: bool = True) -> None:
    """Declare `flags` on an argparse parser or argument group. With `suppress`, a flag that is not
    typed is absent from the namespace (so the caller knows what was typed) and its default is
    filled in later; otherwise the namespace holds the default."""
    for f in flags:
        default = argparse.SUPPRESS if suppress else f.default
        if f.kind == "bool":
            parser.add_argument(f.option, dest=f.name, action="store_true", default=default, help=f.help or None)
            continue
        shown = f" (default {f.default})" if default_in_help and f.default not in (None, "") else ""
        parser.add_argument(f.option, dest=f.name, type=KINDS[f.kind], choices=f.choices, default=default,
                            metavar=None if f.choices else f.kind.upper(), help=(f.help + shown).strip() or None)


def values(flags: Iterable[Flag], given: dict[str, Any]) -> dict[str, Any]:
    """{field: value} for the flags of a table, from a mapping of flag names (an argparse
    namespace's vars, a run's recorded flags): given and not None, else the flag's default."""
    out = {}
    for f in flags:
        v = given.get(f.name)
        out[f.attr] = f.default if v is None else v
    return out
