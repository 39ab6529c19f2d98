"""A retailer's configuration file (YAML or JSON) → a validated :class:`RecsConfig`.

    python -m models.config_file configs/completejourney.yaml   # check a file, print the result
    python -m models.config_file                                # print the built-in defaults

The file holds the same tree as :class:`models.config.RecsConfig`: top-level
``segment_attributes`` and ``fitment_attributes`` plus the ``scoring`` and
``rules`` sections. It overrides only the keys it names; everything else keeps
the SPEC defaults, so ``load_config(None)`` is :data:`DEFAULT_CONFIG`.

Validation happens before any data is read, and each mistake gets its own
message naming the file and the key path:

* unknown key: the allowed keys of that section and the closest match;
* wrong type: what the key expects and what the file gave;
* impossible value: the dataclass's own check, prefixed with the key path;
* unreadable file: not found, bad YAML/JSON syntax (with line and column),
  a key given twice, or a top level that is not a mapping.

The accepted keys and types are read from the dataclasses themselves, so a
field added to ``models/config.py`` is configurable without touching this file.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from models.config import DEFAULT_CONFIG, RecsConfig

_INVALID_PREFIX = "invalid configuration: "


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


# --- reading the file --------------------------------------------------------------

def _yaml_loader():
    """A safe YAML loader that refuses a key given twice (PyYAML keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"line {mark.line + 1}, column {mark.column + 1}: key "
                                  f"{key!r} given twice (first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 construct_mapping)
    return StrictLoader


def parse_text(text: str, fmt: str, source: str = "<config>") -> Any:
    """Parse YAML (``fmt='yaml'``) or JSON text; syntax errors become :class:`ConfigError`."""
    if fmt == "json":
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            if repeated:
                raise ConfigError(f"{source}: key {repeated[0]!r} given twice")
            return dict(pairs)
        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: JSON syntax error at line {err.lineno}, column "
                              f"{err.colno}: {err.msg}") from None
    import yaml
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{source}: YAML syntax error{where}: {detail}") from None


def read_file(path: str) -> Any:
    """The parsed content of a YAML (.yaml/.yml) or JSON (.json) file."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err}") from None
    fmt = "json" if path.lower().endswith(".json") else "yaml"
    return parse_text(text, fmt, path)


# --- types of the dataclass fields ---------------------------------------------------

def _describe(value: Any) -> str:
    """How a wrong value reads in an error: its YAML-ish type and the value itself."""
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _expected(hint: Any) -> str:
    """Human name of a field type."""
    if dataclasses.is_dataclass(hint):
        return "a mapping (section)"
    origin = typing.get_origin(hint)
    if origin in (tuple, list, typing.Tuple, typing.List):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_expected(args[0]).replace('a ', '', 1).replace('an ', '', 1)}s" \
            if args else "a list"
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_expected(a) for a in args) + " or null"
    return {float: "a number", int: "an integer", bool: "a boolean (true/false)",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(value: Any, hint: Any, path: str, source: str) -> Any:
    """``value`` converted to the field type ``hint``, or a ConfigError naming ``path``."""
    def wrong(extra: str = "") -> ConfigError:
        return ConfigError(f"{source}: {path!r} must be {_expected(hint)}, got "
                           f"{_describe(value)}{extra}")

    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        return _convert(value, args[0], path, source) if len(args) == 1 else value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint_text = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
                hint_text = " (YAML reads 1e2 as text; write 100 or 1.0e2)"
            raise wrong(hint_text)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            extra = f" (write [{value}] for one item, [] for none)" if isinstance(
                value, str) else ""
            raise wrong(extra)
        item = args[0] if args else Any
        items = [value[i] if item is Any else _convert(value[i], item, f"{path}[{i}]", source)
                 for i in range(len(value))]
        return tuple(items) if origin is tuple else items
    return value


def _fields(cls) -> Dict[str, Tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: Any, allowed: List[str], section: str, source: str) -> ConfigError:
    where = f"in {section!r}" if section else "at the top level"
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {_join(section, close[0])!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {_join(section, str(key))!r}; allowed keys "
                       f"{where}: {', '.join(allowed)}{hint}")


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _impossible(err: ValueError, section: str, names: List[str], source: str) -> ConfigError:
    """The dataclass's own message, prefixed with the key path(s) it is about."""
    message = str(err)
    if message.startswith(_INVALID_PREFIX):
        message = message[len(_INVALID_PREFIX):]
    named = sorted((m.start(), n) for n in names
                   for m in [re.search(rf"\b{re.escape(n)}\b", message)] if m)
    paths = [_join(section, n) for _, n in named] or [section or "(top level)"]
    return ConfigError(f"{source}: impossible value for {', '.join(map(repr, paths))}: "
                       f"{message}")


def _build(cls, data: Any, base: Any, section: str, source: str):
    """An instance of dataclass ``cls``: ``base`` with the keys of ``data`` replaced."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        label = repr(section) if section else "the top level"
        raise ConfigError(f"{source}: {label} must be a mapping of keys to values, got "
                          f"{_describe(data)}")
    fields = _fields(cls)
    allowed = list(fields)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(key, allowed, section, source)
    changes = {}
    for key, value in data.items():
        _, hint = fields[key]
        path = _join(section, key)
        if dataclasses.is_dataclass(hint):
            changes[key] = _build(hint, value, getattr(base, key), path, source)
        else:
            changes[key] = _convert(value, hint, path, source)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as err:
        scalar = [n for n, (_, h) in fields.items() if not dataclasses.is_dataclass(h)]
        raise _impossible(err, section, scalar, source) from None


# --- public API -------------------------------------------------------------------

def config_from_dict(data: Any, base: RecsConfig = DEFAULT_CONFIG,
                     source: str = "<config>") -> RecsConfig:
    """``base`` overridden by the keys in ``data`` (a parsed file), fully validated.

    >>> config_from_dict({"rules": {"min_price": 2.0}}).rules.min_price
    2.0
    >>> config_from_dict({"rules": {"min_prce": 2}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    models.config_file.ConfigError: <config>: unknown key 'rules.min_prce'; ... 'rules.min_price'?
    """
    return _build(RecsConfig, data, base, "", source)


def load_config(path: Optional[str] = None) -> RecsConfig:
    """The retailer configuration in ``path`` (YAML or JSON); ``None`` gives the SPEC defaults.

    Raises :class:`ConfigError` (a ``ValueError``) with a message that names the
    file and the key on any problem.
    """
    if path is None:
        return DEFAULT_CONFIG
    return config_from_dict(read_file(path), DEFAULT_CONFIG, path)


def config_to_dict(config: RecsConfig) -> Dict[str, Any]:
    """A plain nested dict (lists for tuples); :func:`config_from_dict` turns it back.

    >>> config_from_dict(config_to_dict(DEFAULT_CONFIG)) == DEFAULT_CONFIG
    True
    """
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                    if f.init}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    return plain(config)


def dump_yaml(config: RecsConfig) -> str:
    """The whole configuration as YAML text (keys in dataclass order)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", items, flow_style=True))
    return yaml.dump(config_to_dict(config), Dumper=Dumper, sort_keys=False,
                     default_flow_style=False, width=88)


def main(argv: Optional[List[str]] = None) -> int:
    """Check a config file and print the effective configuration as YAML."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__.strip().splitlines()[0])
        print("usage: python -m models.config_file [CONFIG.yaml|CONFIG.json]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        config = load_config(argv[0] if argv else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_yaml(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
