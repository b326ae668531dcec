"""Format registry: ``get(name, **options)`` makes a format, ``from_json`` remakes one."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from qcompile.errors import ConfigError

__all__ = ["register_format", "get", "from_json", "available", "defaults_of"]

_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {}
_ALIASES: dict[str, str] = {}


def register_format(name: str, cls: type, *, aliases: tuple[str, ...] = (), **preset) -> None:
    """Register ``name`` as ``cls(name=name, **preset, **user options)``."""
    _REGISTRY[name] = (cls, preset)
    for a in aliases:
        _ALIASES[a] = name


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3)
        raise ConfigError(f"unknown numeric format {name!r}",
                          hint=(f"did you mean {', '.join(close)}? " if close else "")
                          + f"known formats: {', '.join(available())}")
    return key


def get(name, **options):
    """The format called ``name`` (``"int4"``, ``"mxfp4"``, ``"nvfp4"``, ``"nf4"``, ...) with
    ``options`` (``group_size=128``, ``symmetric=False``, ``scale_dtype="fp16"``, ...)."""
    from qcompile.formats.base import Format
    if isinstance(name, Format):
        return dataclasses.replace(name, **options) if options else name
    if not isinstance(name, str):
        raise ConfigError(f"a format is named by a string, got {type(name).__name__}")
    key = _canonical(name)
    cls, preset = _REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"name"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"format {key!r} has no option(s) {unknown}",
                          hint=f"its options are {sorted(fields - set(preset))}")
    fixed = set(preset) & set(getattr(cls, "_fixed", ()))
    clash = sorted(k for k in fixed & set(options) if options[k] != preset[k])
    if clash:
        raise ConfigError(f"format {key!r} fixes {clash} to "
                          f"{[preset[k] for k in clash]}",
                          hint="pick the format name that has the value you want "
                               "(e.g. int8 rather than int4 with bits=8)")
    if "group_size" in options and "granularity" not in options:
        options = dict(options, granularity="per_group")  # a group size implies groups
    if options.get("granularity", "per_group") != "per_group" and "group_size" not in options:
        options = dict(options, group_size=None)  # a preset group size does not outlive groups
    kwargs = {**preset, **options}
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return cls(name=key, **kwargs)


def from_json(d: dict):
    d = dict(d)
    return get(d.pop("name"), **d)


def available() -> list[str]:
    return sorted(_REGISTRY)


def defaults_of(name: str) -> dict[str, Any]:
    """The option values ``get(name)`` uses when none are given."""
    cls, preset = _REGISTRY[name]
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    out.update(preset)
    return out
