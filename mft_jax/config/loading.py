"""Reading a run config: YAML, `section.key=value` overrides, type coercion with one-line errors, aliases.

The coercion is ours rather than a validation library's: YAML hands over "2e-5" as a string (a float here),
and a bool or a float where an int belongs is refused rather than converted, with the key in the message.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mft_jax import storage
from mft_jax.config.errors import ConfigError
from mft_jax.config.run import MaskConfig, RunConfig

def parse_layers(value: Any, key: str = "mask.masked_layers") -> list[int]:
    """`[4, 5]`, `"4-7"`, `"0-3,20"`, `7` -> a sorted list of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        layers: list[int] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = part.split("-")
                    layers.extend(range(int(lo), int(hi) + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise ConfigError(f"{key}: cannot read {value!r}; write a list or ranges like \"4-7\" or "
                                  f"\"0-3,20\"") from None
        return layers
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for item in value:
            out.extend(parse_layers(item, key))
        return out
    raise ConfigError(f"{key}: expected a list of layer indices or a range string, got {value!r}")


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])
    return False, tp


def _coerce(key: str, value: Any, tp) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads "2e-5" as a string
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if math.isnan(value):
            raise ConfigError(f"{key} is NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}[{k!r}]", v, val_tp) for k, v in value.items()}
    return value


def canonical_keys(key: str) -> tuple[str, ...]:
    """The dotted RunConfig keys that the dotted `key` sets: itself, or those its alias stands for
    (`mask.keep` -> `mask.keep_attn`, `mask.keep_mlp`)."""
    cls, prefix, parts = RunConfig, "", key.split(".")
    for i, part in enumerate(parts):
        targets = _alias_targets(cls, part)
        if targets:
            return tuple(f"{prefix}{t}" for t in targets)
        tp = typing.get_type_hints(cls).get(part)
        if i == len(parts) - 1 or not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return (key,)
        cls, prefix = tp, f"{prefix}{part}."
    return (key,)


def _alias_targets(cls, key: str) -> tuple[str, ...]:
    """The fields of section `cls` that `key` sets when it is one of the section's aliases (else empty)."""
    targets = getattr(cls, "ALIASES", {}).get(key)
    if targets is None or key in {f.name for f in dataclasses.fields(cls)}:
        return ()
    return targets if isinstance(targets, tuple) else (targets,)


def _build(cls, raw: dict, prefix: str, notes: list[str]):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = getattr(cls, "ALIASES", {})
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        targets = _alias_targets(cls, key)
        if targets:
            note = getattr(cls, "ALIAS_NOTES", {}).get(key)
            if note:
                notes.append(f"note: {full}: {note}")
            for target in targets:
                kwargs[target] = value
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names + list(aliases), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = value
    for key, value in list(kwargs.items()):
        full = f"{prefix}{key}"
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.", notes)
        elif key == "masked_layers":
            kwargs[key] = parse_layers(value, full)
        elif key == "mode" and cls is MaskConfig and value in ("local", "global"):
            kwargs[key] = value
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_override(tree: dict, assignment: str) -> None:
    key, eq, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"override {assignment!r} must look like section.key=value, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                          f"{key}='\"...\"'") from None
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict, overrides: list[str] = (), verbose: bool = True) -> RunConfig:
    """Builds and validates a `RunConfig` from a nested dict plus `section.key=value` overrides."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"a run config is a mapping of sections (model:, mask:, data:, ...), got "
                          f"{type(raw).__name__} {str(raw)[:60]!r}")
    tree = copy.deepcopy(raw or {})
    for assignment in overrides:
        _set_override(tree, assignment)
    notes: list[str] = []
    cfg = _build(RunConfig, tree, "", notes)
    if verbose:
        for note in notes:
            print(note)
    cfg.validate()
    return cfg


def read_yaml(path: str | Path, what: str = "config file"):
    """The parsed YAML file at `path`. A missing file, a directory, binary content or a YAML syntax error (as
    file:line:column) is one line naming it (`ConfigError`)."""
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} " + ("is a directory; give the YAML file" if path.is_dir()
                                                      else "does not exist"))
    try:
        if storage.is_remote(path):
            return yaml.safe_load(path.read_bytes().decode("utf-8"))
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ConfigError(f"{where}: YAML syntax error: {problem or str(e).splitlines()[0]}") from None


def load(path: str | Path, overrides: list[str] = (), verbose: bool = True) -> RunConfig:
    """Reads a YAML run config (`read_yaml`), applies `section.key=value` overrides, and validates it; a bad key
    or value is one line naming the file and the key (`ConfigError`)."""
    raw = read_yaml(path)
    try:
        return from_dict(raw, overrides, verbose)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
