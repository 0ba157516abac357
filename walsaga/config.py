"""Configuration files: one loader at the edge, TOML plus ``WALSAGA_*`` overrides.

Every key of a file can also come from the environment:
``WALSAGA_<TABLE>__<KEY>`` sets ``[table] key`` (``WALSAGA_RELAY__HTTP_PORT=9200``);
in a pass-through table such as ``[kafka]``, underscores become dots
(``WALSAGA_KAFKA__BOOTSTRAP_SERVERS`` sets ``"bootstrap.servers"``); in an array
of tables such as ``[[source]]``, the element is picked by its ``name``
(``WALSAGA_SOURCE__CUSTOMERS__DSN``); when the file has no such array (or
there is no file), the names the variables use make its elements. A value
from the environment is a string
unless the schema says otherwise: a number, a boolean or a list where the
schema asks for one (lists written as TOML or JSON, ``["P0001"]``), text
everywhere else, so a password such as ``2024-01-01`` stays that text.
Errors name the key and the file, or the variable it came from.

:func:`write_toml` is the one way walsaga writes a configuration file (the
demo, the tests): values are quoted by a TOML writer, never by hand.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError

from walsaga.errors import ConfigError

ENV_PREFIX = "WALSAGA_"

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every configuration table: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_type(model: type[BaseModel] | None, path: list[str]) -> Any:
    """The annotation the schema gives the key at `path` (None when it cannot say)."""
    node: Any = model
    for part in path:
        node = _unwrap(node)
        if typing.get_origin(node) is list:
            node = _unwrap(typing.get_args(node)[0])
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(part)
        if field is None:
            return None
        node = field.annotation
    return _unwrap(node)


def _env_value(raw: str, annotation: Any) -> Any:
    """The environment's text as the schema wants it: parsed only for collections;
    numbers and booleans are converted by the schema itself."""
    if typing.get_origin(annotation) in (list, tuple, set, frozenset, dict):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return raw
    return raw


def apply_env(
    data: dict[str, Any],
    environ: Mapping[str, str],
    *,
    model: type[BaseModel] | None = None,
    passthrough: frozenset[str] = frozenset({"kafka"}),
    tables: frozenset[str] | None = None,
) -> dict[tuple[str, ...], str]:
    """Apply ``WALSAGA_*`` overrides to `data` in place.

    Returns the keys set, each with the variable that set it. Only `tables`
    are considered (when given): one environment can then hold the settings
    of several walsaga programs without one tripping another.
    """
    used: dict[tuple[str, ...], str] = {}
    # Arrays of tables the file has: there, a name the file lacks is a mistake.
    from_file = {k for k, v in data.items() if isinstance(v, list) and v}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        table, rest = parts[0].lower(), parts[1:]
        if not rest or not all(rest):
            continue
        if tables is not None and table not in tables:
            continue
        current = data.get(table)
        if current is None and _is_list(_field_type(model, [table])):
            # An array of tables given by the environment alone: each name it
            # uses is an element ("WALSAGA_SOURCE__ORDERS__DSN" makes source "orders").
            current = data[table] = []
        if table in passthrough:
            key = ".".join(rest).lower().replace("_", ".")
            data.setdefault(table, {})[key] = raw
            used[(table, key)] = var
        elif isinstance(current, list):
            if len(rest) < 2:
                continue
            name = rest[0].lower()
            element = next(
                (
                    e
                    for e in current
                    if isinstance(e, dict) and str(e.get("name", "")).lower() == name
                ),
                None,
            )
            if element is None:
                if table in from_file:
                    raise ConfigError(f"{var}: no [[{table}]] named {name!r} to override")
                element = {"name": name}
                current.append(element)
            path = [r.lower() for r in rest[1:]]
            _set(element, path, _env_value(raw, _field_type(model, [table, *path])))
            used[(table, name, *path)] = var
        else:
            target = data.setdefault(table, {})
            if not isinstance(target, dict):
                continue
            path = [r.lower() for r in rest]
            _set(target, path, _env_value(raw, _field_type(model, [table, *path])))
            used[(table, *path)] = var
    return used


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a :class:`ConfigError`."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load(
    path: str | Path | None,
    model: type[M],
    *,
    environ: Mapping[str, str] | None = None,
    passthrough: frozenset[str] = frozenset({"kafka"}),
) -> M:
    """Read `path` (or only the environment when None) into `model`."""
    where = str(path) if path is not None else "environment"
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    from_env = apply_env(
        data,
        os.environ if environ is None else environ,
        model=model,
        passthrough=passthrough,
        tables=frozenset(model.model_fields),
    )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe(e, data, from_env)}") from e


def describe(
    error: ValidationError,
    data: Any = None,
    from_env: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    """One line per problem: ``relay.http_port: Input should be a valid integer``."""
    lines = []
    for problem in error.errors():
        parts: list[str] = []
        raw_path: list[str] = []
        node = data
        for loc in problem["loc"]:
            if isinstance(loc, int) and isinstance(node, list) and loc < len(node):
                node = node[loc]
                name = node.get("name") if isinstance(node, dict) else None
                parts[-1] = f"{parts[-1]}[{name!r}]" if name else f"{parts[-1]}[{loc}]"
                if name:
                    raw_path.append(str(name).lower())
                continue
            parts.append(str(loc))
            raw_path.append(str(loc))
            node = node.get(loc) if isinstance(node, dict) else None
        key = ".".join(parts) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        var = (from_env or {}).get(tuple(raw_path))
        origin = f" (from {var})" if var else ""
        lines.append(f"{key}{origin}: {message}")
    return "; ".join(lines)


def write_toml(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as a TOML file (values quoted by the writer); returns the path."""
    target = Path(path)
    target.write_text(tomli_w.dumps(_plain(data)))
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
