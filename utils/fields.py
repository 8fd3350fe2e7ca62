"""Typed config fields: a default, a one-line reason, and the values accepted; checked one value at a time.

Why here, on the ground floor: every layer owns its config section (``models/config.py``,
``utils/data/config.py``, ``utils/training/config.py``) and declares its fields with ``opt``;
``utils/config.py`` assembles the sections and supplies the registries whose keys are the
choices of the fields that name a part. What a config names is known here before torch loads: a registry's
names (``Registry``), a part's rules (``PartRules``), and code to import when it is called (``resolve``,
``Deferred``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import math
import sys
import typing
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False) -> Any:
    """A config field with its documentation and the values it accepts. A field that names a part has no
    ``choices`` here: its registry supplies them (``utils.config.REGISTRIES``)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a config section, by name, with their types resolved (not the strings of annotations)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def accepts(f: dataclasses.Field, choices: Collection | None = None) -> str:
    """What a field accepts, in words: for error messages and the generated reference."""
    m = f.metadata
    choices = choices if choices is not None else m["choices"]
    if choices:
        return "one of " + ", ".join(map(str, choices))
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        f.type, "a list of integers")
    if m["min"] is not None:
        kind += f" {'>' if m['min_exclusive'] else '>='} {m['min']:g}"
    if m["max"] is not None:
        kind += f" and <= {m['max']:g}"
    return kind


def is_whole(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(key: str, f: dataclasses.Field, value: Any, choices: Collection | None = None) -> Any:
    """Check one value against its field (and ``choices``, a registry's keys, when given); return it in the
    field's type, or raise a one-line ``UserError`` naming the key and what it accepts."""
    choices = choices if choices is not None else f.metadata["choices"]
    bad = UserError(f"{key}: got {value!r}, expected {accepts(f, choices)}")
    t = f.type
    if t is bool:
        if not isinstance(value, bool):
            raise bad
    elif t is int:
        if not is_whole(value):
            raise bad
    elif t is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"{key}: got {value}, expected a finite number ({accepts(f, choices)})")
        value = float(value)
    elif t is str:
        if value is False and choices and "no" in choices:
            value = "no"  # YAML 1.1 reads a bare no (train.mixed_precision=no, Accelerate's word) as false
        if not isinstance(value, str):
            raise bad
    else:  # list[int]; a single integer is a list of one (model.hidden: 400, as configs wrote it before lists)
        if is_whole(value):
            value = [value]
        empty_ok = not default_of(f)  # a list whose default is empty (model.latent_dims) may be written empty
        if not isinstance(value, list) or not (value or empty_ok) or not all(is_whole(v) and v > 0 for v in value):
            what = "a list" if empty_ok else "a non-empty list"
            raise UserError(f"{key}: got {value!r}, expected {what} of positive integers")
        return list(value)
    m = f.metadata
    if choices and value not in choices:
        raise bad
    if m["min"] is not None and (value < m["min"] or (m["min_exclusive"] and value == m["min"])):
        raise bad
    if m["max"] is not None and value > m["max"]:
        raise bad
    return value


@dataclass(frozen=True)
class Option:
    """A command-line option declared once, beside the part whose numbers depend on it (a metric's, an ex-post
    sampler's): ``--name`` with its default, help line and check. ``type`` is int, float, str, bool (a switch) or
    list (of whole numbers of at least 1); ``min`` the least value accepted (``min_exclusive``: not even it);
    ``choices`` the values accepted. ``recorded``: kept beside the numbers it changes (eval.json's
    ``computed_with``); ``flag``: False for a setting of the Python API alone, with no flag."""

    name: str
    default: Any
    help: str | None = None
    type: Callable[[str], Any] = int
    min: float | None = None
    min_exclusive: bool = False
    choices: tuple | None = None
    recorded: bool = True
    flag: bool = True

    def add_to(self, p: Any, default: Any = dataclasses.MISSING) -> None:
        """Add ``--name`` to the argparse parser ``p``, with ``default`` in place of the declared one when given
        (None: a flag whose absence is told apart from its default)."""
        default = self.default if default is dataclasses.MISSING else default
        if self.type is bool:
            p.add_argument(f"--{self.name}", action="store_true", help=self.help)
        else:
            p.add_argument(f"--{self.name}", type=self.type, default=default, choices=self.choices, help=self.help)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``must be at least 1, got 0``), or None when it is accepted."""
        if value is None and self.default is None:
            return None  # unset, where unset is allowed (a path given only when wanted)
        t, low = self.type, self.min
        if t is list:
            if not isinstance(value, (list, tuple)) or not value or not all(is_whole(v) and v >= 1 for v in value):
                return f"must be a non-empty list of whole numbers of at least 1, got {value!r}"
            return None
        if t is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if t is int and not is_whole(value):
            return f"must be a whole number, got {value!r}"
        if t is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return f"must be a finite number, got {value!r}"
        if t is str and not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if low is not None and (value < low or (self.min_exclusive and value == low)):
            return f"must be {'more than' if self.min_exclusive else 'at least'} {low:g}, got {value!r}"
        return None

    def check(self, value: Any) -> None:
        """Refuse a bad value of the flag in one line."""
        problem = self.problem(value)
        if problem:
            raise UserError(f"--{self.name} {problem}")

    def coerced(self, value: Any) -> Any:
        """An accepted value in the option's own type (an int for a float option, a tuple for a list one)."""
        return float(value) if self.type is float else list(value) if self.type is list else value


class Registry(Collection):
    """A registry's names, known before its module is imported; the registry itself on ``load()`` (or on a lookup).

    A registry is a dict (or tuple) literal assigned at the top of the module that defines its parts, and those
    modules import torch. A config, or a command line, names parts, and its mistakes should be said at once,
    not after torch has loaded: while the module is not loaded, the names are read from that literal in its
    source; once it is loaded, from the live registry (where a test or a user may have added an entry). A test
    holds the two equal for every registry.
    """

    def __init__(self, module: str, variable: str):
        self.module, self.variable = module, variable
        self._source_names: list[str] | None = None

    def load(self) -> Any:
        """The registry itself (importing its module)."""
        return getattr(importlib.import_module(self.module), self.variable)

    @property
    def file(self) -> Path:
        return Path(importlib.util.find_spec(self.module).origin).resolve()

    def names(self) -> list[str]:
        loaded = sys.modules.get(self.module)
        if loaded is not None and hasattr(loaded, self.variable):
            return list(getattr(loaded, self.variable))
        if self._source_names is None:
            self._source_names = self._read_names()
        return self._source_names

    def _read_names(self) -> list[str]:
        for node in ast.parse(self.file.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id == self.variable:
                value = node.value
                keys = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", None)
                if keys is None or not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in keys):
                    break
                return [k.value for k in keys]
        raise LookupError(f"{self.module} assigns no literal dict or tuple of names to {self.variable}")

    def __getitem__(self, name: str) -> Any:
        return self.load()[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"{self.module}.{self.variable}"


def resolve(reference: str) -> Any:
    """The object a ``"package.module:name"`` reference names, importing its module: how a torch-free module
    points at code that needs torch without importing it."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


class Deferred:
    """A call to a function named by reference (``resolve``), with arguments fixed now (as ``functools.partial``)
    and the function's module imported at the first call: a registry entry's loader, kept in a module that
    must import no torch."""

    def __init__(self, reference: str, *args: Any):
        self.reference, self.args = reference, args

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.reference)(*self.args, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Deferred({', '.join(map(repr, (self.reference, *self.args)))})"


class PartRules:
    """What a part states for config validation and resolution (class attributes and class methods), without
    torch: a config's rules across parts are checked before torch loads. A kind's registry maps each name to its
    part's rules class; the part's torch class subclasses its rules class, so the two cannot disagree.
    ``implementation`` names that torch class (``"models.regularisers:MMD"``)."""

    implementation = ""

    @classmethod
    def load(cls) -> type:
        """The part's torch class: the one ``implementation`` names, or this class where it is that class or a
        subclass of it (a part defined with torch and registered directly)."""
        implementation = resolve(cls.implementation)
        return cls if issubclass(cls, implementation) else implementation
