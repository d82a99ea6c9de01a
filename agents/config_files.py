"""Typed dataclass configs, optionally read from a YAML file in ``configs/``, and the flags derived from them.

Precedence: dataclass defaults < YAML file < options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml


def build_config(cls, path: str | Path | None = None, **overrides):
    """An instance of dataclass ``cls`` from an optional YAML file plus non-None overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"Config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {path} must hold a mapping of field: value.")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}.")
    for name in known:
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        if name in values and isinstance(values[name], list) and "tuple" in str(field.type):
            values[name] = tuple(values[name])
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} needs {missing} (on the command line or in the config file).")
    return cls(**values)


# ---------------------------------------------------------------- command-line flags from a dataclass
# Every `step` command derives its flags from its config dataclass with the two functions below, so a field is
# defined once (name, type, default, help, limits) and a YAML file (--config) and a flag override the same field.
# Field metadata (all optional; ``option()`` writes it): help, choices, min, flag (a custom flag name, e.g.
# "--no-videos" for a True-by-default bool), positional (nargs="+"), cli=False (not a flag: tests/programs only).

YAML_DEST = "config_file"  # where argparse keeps --config FILE


def option(default=dataclasses.MISSING, *, help: str = "", choices=None, min=None, flag: str | None = None,
           positional: bool = False, cli: bool = True, default_factory=dataclasses.MISSING):
    """A dataclass field with the metadata ``add_config_arguments`` turns into a flag."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "flag": flag,
                "positional": positional, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_kind(tp) -> tuple[type, type | None]:
    """(base type, element type for tuples) of a field annotation; ``X | None`` counts as X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    origin = typing.get_origin(tp) or tp
    if origin is tuple:
        elem = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return tuple, elem
    return origin, None


def _tuple_parser(elem: type, name: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(elem(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name(name)} takes comma-separated {elem.__name__} values, "
                                             f"got {text!r}") from None
    return parse


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_arguments(parser, cls, only=None, config_file: bool = True) -> None:
    """One flag per field of dataclass ``cls`` (``--batch-size`` for ``batch_size``), plus ``--config FILE``.

    Flags default to "not given" (argparse.SUPPRESS), so only the flags on the command line override the YAML
    file and the dataclass defaults (``config_from_args``). ``only``: the field names to expose (sub-commands).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False or (only is not None and f.name not in only):
            continue
        base, elem = _field_kind(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        text = meta.get("help", "")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", help=text)
            continue
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            flag = meta.get("flag") or (flag_name("no_" + f.name) if default is True else flag_name(f.name))
            parser.add_argument(flag, action="store_const", const=not flag.startswith("--no-"), help=text, **kwargs)
            continue
        if base is tuple:
            kwargs["type"] = _tuple_parser(elem, f.name)
        elif base is dict:
            kwargs["type"] = _json_dict
        elif base in (int, float, str):
            kwargs["type"] = base
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        shown = "required" if default is dataclasses.MISSING else (None if default is None else _shown(default))
        text = f"{text} (default: {shown})".strip() if shown is not None else text
        parser.add_argument(meta.get("flag") or flag_name(f.name), help=text, **kwargs)
    if config_file and "config" not in hints:  # (train-bench's own `config` field is the training config it marks)
        parser.add_argument("--config", dest=YAML_DEST, default=None,
                            help=f"YAML file of {cls.__name__} fields; flags given here override it")


def config_from_args(cls, args, **fixed):
    """The config of a command: dataclass defaults < ``--config`` YAML < the flags given < ``fixed``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name: value for name, value in vars(args).items() if name in names}
    given.update(fixed)
    return build_config(cls, getattr(args, YAML_DEST, None), **given)


def validate_fields(cfg) -> None:
    """The checks that field metadata declares (``min``, ``choices``); call it from ``__post_init__``.

    Errors name the flag, as users meet it on the command line."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        minimum, choices = f.metadata.get("min"), f.metadata.get("choices")
        if minimum is not None and value < minimum:
            raise ValueError(f"{flag_name(f.name)} must be at least {minimum}, got {value}.")
        if choices and value not in choices:
            raise ValueError(f"{flag_name(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}.")
