"""Run options in a file: ``--config FILE`` (YAML or JSON, keyed by the ``Options`` field names, which are
the flags without ``--``) and the ``config.yaml`` every ``--save`` directory holds, which repeats its run.

YAML numbers are read as YAML 1.2 reads them, so that a hand-written file means what it looks like:
``1e-4`` is a number (YAML 1.1 reads it as text) and ``2:4`` is text (YAML 1.1: 124, in base 60)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

SUFFIXES = (".yaml", ".yml", ".json")
ALIASES = {"model_name_or_path": "model"}  # as the flags
HEADER = ("# Mosaic: the resolved options of this run. `python main.py --config <this file>` repeats it;\n"
          "# flags on the command line override these values (give a new --save and --save_model). A switch\n"
          "# that is true here (overwrite, resume, offline, ...) is turned off here, not by a flag.\n")

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class ConfigError(ValueError):
    """A config file that cannot be read as options: one line, without the file's name."""


def _yaml12_numbers(cls, keep: bool = False):
    """YAML 1.2's plain numbers in place of 1.1's (no base 60, exponents without a dot); ``keep``: besides
    1.1's, for the dumper, which then quotes any text that either loader would read as something else."""
    cls.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if keep or tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
    cls.add_implicit_resolver(
        _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return cls


@_yaml12_numbers
class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


class _Dumper(yaml.SafeDumper):
    pass


_yaml12_numbers(_Dumper, keep=True)


def _yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"not valid YAML: {what}{where}"


def _json_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"'{key}' is given twice")
        out[key] = value
    return out


def load(path: str) -> dict:
    """The file's mapping of option names to values, as written (aliases not yet resolved)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError("is a directory, not a file")
    if p.suffix.lower() not in SUFFIXES:
        raise ConfigError("give a .yaml, .yml or .json file")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file") from None
    except UnicodeDecodeError:
        raise ConfigError("cannot be read: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror or e})") from None
    if p.suffix.lower() == ".json":
        try:
            values = json.loads(text, object_pairs_hook=_json_pairs) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    else:
        try:
            values = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(e)) from None
    if values is None:  # an empty file: no options
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"must hold a mapping of option names to values, not a {type(values).__name__}")
    return values


def options(values: dict, known) -> dict:
    """The file's values keyed by ``Options`` field, each key checked against ``known`` (aliases resolved)."""
    import difflib

    out = {}
    for key, value in values.items():
        name = ALIASES.get(key, key) if isinstance(key, str) else key
        if name not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '{key}'{hint}")
        if name in out:
            both = " and ".join(f"'{k}'" for k in values if ALIASES.get(k, k) == name)
            raise ConfigError(f"{both} name the same option; keep one")
        out[name] = value
    return out


def _plain(value):
    return value if value is None or isinstance(value, str | bool | int | float) else str(value)


def dump(args: dict) -> str:
    """``config.yaml``: every option of a run, in the order of ``Options``."""
    body = yaml.dump({k: _plain(v) for k, v in args.items()}, Dumper=_Dumper, sort_keys=False,
                     allow_unicode=True, default_flow_style=False)
    return HEADER + body


def write(path: str | Path, args: dict) -> None:
    Path(path).write_text(dump(args), encoding="utf-8")
