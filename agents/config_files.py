"""Typed dataclass configs, optionally read from a YAML file in ``configs/``.

Precedence: dataclass defaults < YAML file < options given on the command line.
"""

from __future__ import annotations

import dataclasses
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


def check_minimums(cfg, **minimums) -> None:
    """Refuse (ValueError naming the option) a numeric field below its minimum, before any work starts."""
    for name, minimum in minimums.items():
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")
