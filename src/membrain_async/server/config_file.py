"""`membrain serve --config FILE`: the serve settings as a TOML file.

Keys are the long flag names without the leading `--` (`capacity`, `disk-path`, `auth-file`), one per
setting that `ServerConfig` declares, so a new setting is a key here with no other change. Precedence,
lowest first: defaults, the file, `MEMBRAIN_*` environment variables, flags; the file is named by
`--config` or else by `MEMBRAIN_CONFIG`. A key the server does not know, or a value of the wrong type,
stops the server with one line naming the file and the key: a typo must not silently fall back to a
default (an auth file left out would open the store to anyone on the network).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from typing import Any, Mapping

from ..config import ConfigError, ServerConfig, _human_size, parse_size
from ..tls import server_context
from .app import check_bind
from .auth import Authorizer

CONFIG_ENV = "MEMBRAIN_CONFIG"


def key_of(f: dataclasses.Field) -> str:
    return f.name.replace("_", "-")


_FIELDS = {key_of(f): f for f in ServerConfig.fields()}


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # TOML dates and times


# What each kind of setting takes in TOML, and how an error message asks for it.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "boolean": ((bool,), "true or false"),
    "size": ((int, str), 'a byte count or a size string like "8GiB"'),
    "number": ((int, float), "a number"),
    "integer": ((int,), "an integer"),
    "string": ((str,), "a string"),
}


def _kind(f: dataclasses.Field) -> str:
    if isinstance(f.default, bool):
        return "boolean"
    if f.metadata.get("parse") is parse_size:
        return "size"
    if isinstance(f.default, float):
        return "number"
    if isinstance(f.default, int):
        return "integer"
    return "string"


def _value(f: dataclasses.Field, value: Any) -> Any:
    """The file's value for one setting, checked against the setting's kind (ValueError says what was wanted)."""
    kind = _kind(f)
    types, wanted = _KINDS[kind]
    # TOML's booleans are Python ints: only a boolean setting takes one.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"expected {wanted}, got {_toml_type(value)}")
    if kind == "size":
        return parse_size(str(value))  # a byte count meets the same rules as a flag's (no negative sizes)
    parse = f.metadata.get("parse")
    return parse(value) if parse else type(f.default)(value)


def keys_table() -> str:
    """The Markdown table of every key, as docs/deployment.md prints it."""
    rows = ["| key | value | env var | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, f in _FIELDS.items():
        kind = _kind(f)
        default = f'"{_human_size(f.default)}"' if kind == "size" else json.dumps(f.default)
        rows.append(f"| `{key}` | {kind} | `{f.metadata['env']}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def read_config_file(path: str) -> dict[str, Any]:
    """The settings a TOML file gives, by ServerConfig field name; ConfigError names the file and the key."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in doc.items():
        f = _FIELDS.get(key)
        if f is None:
            near = difflib.get_close_matches(key.replace("_", "-"), _FIELDS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(_FIELDS)})"
            raise ConfigError(f"config file {path}: unknown key '{key}'{hint}")
        try:
            values[f.name] = _value(f, value)
        except ValueError as exc:
            raise ConfigError(f"config file {path}: key '{key}': {exc}") from None
    return values


def serve_config(
    config_path: str | None, flags: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[ServerConfig, str | None]:
    """The server's settings from the file (flag, else `MEMBRAIN_CONFIG`), the environment and the flags.

    Returns the config and the file it read (None without one). A file value counts only where its
    environment variable is unset, so each layer overrides the one below it.
    """
    path = config_path or env.get(CONFIG_ENV) or None
    file_values = read_config_file(path) if path else {}
    envs = {f.name: f.metadata["env"] for f in ServerConfig.fields()}
    overrides = {name: v for name, v in file_values.items() if envs[name] not in env}
    given = {name: v for name, v in flags.items() if v is not None}
    from_file = set(overrides) - set(given)
    overrides.update(given)
    try:
        return ServerConfig.from_sources(env=env, overrides=overrides), path
    except ConfigError as exc:
        if exc.field in from_file:  # the file's value is the one in use: say where to change it
            raise ConfigError(f"config file {path}: key '{exc.field.replace('_', '-')}': {exc}", exc.field) from None
        raise


def check_files(config: ServerConfig) -> None:
    """Dry run for `--check-config`: read the auth file and the TLS certificate as start-up would.

    Opens no port and no disk tier; ConfigError (one line) when a file would stop the server.
    """
    check_bind(config)
    try:
        Authorizer.from_file(config.auth_file)
        if config.tls_cert:
            server_context(config.tls_cert, config.tls_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
