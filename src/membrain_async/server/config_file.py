"""`membrain serve --config FILE`: the serve settings as a TOML file.

Keys are the long flag names without their dashes (`capacity`, `disk-path`, `auth-file`), one per
setting that `ServerConfig` declares, so a new setting is a key here with no other change. Precedence,
lowest first: defaults, the file, `MEMBRAIN_*` environment variables, flags; the file is named by
`--config` or else by `MEMBRAIN_CONFIG`. A key the server does not know, or a value of the wrong type,
stops the server with one line naming the file and the key: a typo must not silently fall back to a
default (an auth file left out would open the store to anyone on the network).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from typing import Any, Mapping

from ..config import ConfigError, ServerConfig, parse_size
from ..tls import server_context
from .auth import Authorizer

CONFIG_ENV = "MEMBRAIN_CONFIG"


def key_of(f: dataclasses.Field) -> str:
    return f.name.replace("_", "-")


_FIELDS = {key_of(f): f for f in ServerConfig.fields()}


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # TOML dates and times


def _value(f: dataclasses.Field, value: Any) -> Any:
    """The file's value for one setting, checked against the setting's type (ValueError says what was wanted)."""
    parse = f.metadata.get("parse")
    if isinstance(f.default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif parse is parse_size:
        ok, wanted = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)), \
            'a byte count or a size string like "8GiB"'
    elif isinstance(f.default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(f.default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise ValueError(f"expected {wanted}, got {_toml_type(value)}")
    return parse(value) if parse else type(f.default)(value)


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
    overrides.update({name: v for name, v in flags.items() if v is not None})
    return ServerConfig.from_sources(env=env, overrides=overrides), path


def check_files(config: ServerConfig) -> None:
    """Dry run for `--check-config`: read the auth file and the TLS certificate as start-up would.

    Opens no port and no disk tier; ConfigError (one line) when a file would stop the server.
    """
    from .app import check_bind

    check_bind(config)
    try:
        Authorizer.from_file(config.auth_file)
        if config.tls_cert:
            server_context(config.tls_cert, config.tls_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
