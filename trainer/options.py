"""A dataclass as a command line and a config file: one ``--kebab-case`` option per field (its ``--help`` text, the
allowed words and the default from the field), the values of a ``.toml`` / ``.json`` config file checked against
the field types, and every mistake one :class:`~longalign_core.errors.BadConfigError` naming the option, or the
file and key. A field added to :class:`~trainer.config.TrainConfig` or :class:`~trainer.evaluate.config.EvalConfig`
is an option, a config-file key and a checked value with no other edit.

Why argparse and not a library that builds it from the dataclass: transformers' ``HfArgumentParser`` (installed)
lists every option twice in ``--help`` (``--train_steps TRAIN_STEPS, --train-steps TRAIN_STEPS``), turns a
``False`` default into ``--dry-run [DRY_RUN]`` with no ``--no-dry-run``, fills every option the user did not
give with its default, so a flag cannot be told from a default and the precedence flags > ``--config`` file >
CPU demo profile > defaults cannot be kept, reads no TOML, and hands config-file values to the dataclass
unchecked (``train_steps = "ten"`` arrives as a string). Other parsers (tyro, jsonargparse, pydantic-settings) are
not dependencies of the project, and what this module adds to argparse is small: the field types come from
:func:`typing.get_type_hints` (not from annotation strings), and one table says what each type accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

from longalign_core.errors import BadConfigError


def _bool(v):
    return v if isinstance(v, bool) else None


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float(v):
    return float(v) if _int(v) is not None or isinstance(v, float) else None


def _str(v):
    return v if isinstance(v, str) else None


def _strings(v):
    """A list of strings; one string is a list of one."""
    if isinstance(v, str):
        return [v]
    return list(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _count_or_name(v):
    """A count, a string of digits read as that count (as the command line gives it), or a file name."""
    if _int(v) is not None:
        return v
    return (int(v) if v.strip().isdigit() else v) if isinstance(v, str) else None


#: Field type -> (how a mistake describes what it takes, the check: the value as the field holds it, or None
#: when the value is not of that type). The keys are the types a field may have, each optionally ``| None``.
ACCEPTS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", _bool),
    int: ("an integer", _int),
    float: ("a number", _float),
    str: ("a string", _str),
    list[str]: ("a list of strings", _strings),
    (int, str): ("a count or a file name", _count_or_name),
}
#: Metadata keys of :func:`option` that are not ``argparse.add_argument`` arguments.
_OWN_KEYS = ("help", "aliases")


def option(default, help: str, **add_argument):
    """A dataclass field that is also an option: ``help`` is its ``--help`` text; ``aliases`` (more spellings),
    ``nargs``, ``action`` and ``metavar`` go to ``argparse.add_argument``. A list default is given as ``list``."""
    metadata = {"help": help, **add_argument}
    if isinstance(default, type):  # a mutable default (list): give its factory
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of a field: ``train_steps`` -> ``--train-steps``."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_kinds(cls) -> dict[str, tuple[Any, bool]]:
    """Field name -> (its key in :data:`ACCEPTS`, whether None is allowed), from the resolved annotations.
    An annotation outside the table is a programming error, raised when the class is first used."""
    kinds = {}
    for name, annotation in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        members = tuple(a for a in typing.get_args(annotation) if a is not type(None)) if union else (annotation,)
        key = members[0] if len(members) == 1 else members
        if key not in ACCEPTS:
            raise TypeError(f"{cls.__name__}.{name}: {annotation} is not a type trainer.options reads; use one of "
                            f"{[getattr(k, '__name__', str(k)) for k in ACCEPTS]}, each optionally '| None'")
        kinds[name] = (key, union and len(members) < len(typing.get_args(annotation)))
    return kinds


def check_value(cls, name: str, value: Any, where: str) -> Any:
    """``value`` as field ``name`` of ``cls`` holds it, or :class:`BadConfigError` ``"<where> must be …"``."""
    key, optional = field_kinds(cls)[name]
    expected, accept = ACCEPTS[key]
    checked = None if value is None else accept(value)
    if checked is None and not (value is None and optional):
        raise BadConfigError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")
    return checked


def coerce_fields(obj, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """Type-check every field of the dataclass ``obj`` in place (a wrong type raises :class:`BadConfigError`
    naming the flag); returns the messages of the fields whose value is not one of its ``choices``."""
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(type(obj), f.name, getattr(obj, f.name), flag(f.name)))
    return [f"{flag(k)} {getattr(obj, k)!r} is not one of {', '.join(v)}" for k, v in choices.items()
            if getattr(obj, k) is not None and getattr(obj, k) not in v]


def add_field_options(ap: argparse.ArgumentParser, cls, choices: dict[str, tuple[str, ...]]) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (help from its metadata, the allowed words and the
    default appended); unset flags parse as None so that lower-precedence sources can fill them."""
    for f in dataclasses.fields(cls):
        key, _ = field_kinds(cls)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f" [{' | '.join(choices[f.name])}]" if f.name in choices else ""
        extra = {k: v for k, v in f.metadata.items() if k not in _OWN_KEYS}
        if key is bool:
            extra.setdefault("action", argparse.BooleanOptionalAction)
        elif "nargs" not in extra:
            extra["type"] = {int: int, float: float}.get(key, str)  # the rest is checked on creation
        ap.add_argument(flag(f.name), *f.metadata.get("aliases", []), dest=f.name, default=None,
                        help=f"{f.metadata['help']}{allowed} (default: {default})".replace("%", "%%"), **extra)


def read_config_file(path: str | Path, cls, prog: str) -> dict[str, Any]:
    """The options of a ``.toml`` or ``.json`` config file for ``cls``, each type-checked (errors name the file
    and key; an unknown key gets the closest option name, or ``prog --help``)."""
    path = Path(path)
    if not path.is_file():
        raise BadConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadConfigError(f"--config {path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadConfigError(f"{path}: TOML syntax error: {exc}. Fix the file (strings need quotes, e.g. "
                                 f'split_mode = "reference")') from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadConfigError(f"{path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                                 f"(use a .toml file for TOML)") from None
    if not isinstance(values, dict):
        raise BadConfigError(f"{path}: expected a table of options (key = value), got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; see {prog} --help"
            raise BadConfigError(f"{path}: unknown option {key!r}{hint}")
        out[name] = check_value(cls, name, value, f"{path}: {key}")
    return out
