"""`membrain serve --config FILE`: keys as the flags, env and flags above the file, mistakes named in one line."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from membrain_async.cli import main
from membrain_async.config import ServerConfig
from membrain_async.server.config_file import key_of, keys_table, serve_config
from membrain_async.server.embed import server_command
from membrain_async.testing.certs import make_certs

NO_FLAGS = {f.name: None for f in ServerConfig.fields()}


def _write(tmp_path, text: str, name: str = "membrain.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_file_sits_below_environment_variables_and_flags(tmp_path):
    path = _write(tmp_path, 'capacity = "48MiB"\nport = 9300\nlog-level = "debug"\nallow-insecure-bind = true\n'
                            "idle-timeout = 7\n")
    env = {"MEMBRAIN_PORT": "9400"}
    config, used = serve_config(path, {**NO_FLAGS, "log_level": "warning"}, env)
    assert used == path
    assert config.capacity == 48 << 20 and config.allow_insecure_bind is True  # from the file
    assert config.idle_timeout == 7.0 and isinstance(config.idle_timeout, float)
    assert config.port == 9400  # the environment beats the file
    assert config.log_level == "warning"  # a flag beats both


def test_membrain_config_names_the_file_unless_the_flag_does(tmp_path):
    from_env = _write(tmp_path, "port = 9301\n", "env.toml")
    from_flag = _write(tmp_path, "port = 9302\n", "flag.toml")
    assert serve_config(None, NO_FLAGS, {"MEMBRAIN_CONFIG": from_env})[0].port == 9301
    assert serve_config(from_flag, NO_FLAGS, {"MEMBRAIN_CONFIG": from_env})[0].port == 9302
    assert serve_config(None, NO_FLAGS, {}) == (ServerConfig(), None)


def test_every_setting_has_a_key_named_as_its_flag(tmp_path):
    # One line per setting, each a value other than the default: the file can say anything a flag can.
    certs = make_certs(tmp_path)
    strings = {"host": "0.0.0.0", "eviction": "lru", "auth_file": str(tmp_path / "auth.json"),
               "tls_cert": certs.cert_file, "tls_key": certs.key_file, "log_level": "debug", "disk_path": str(tmp_path)}
    different = {
        str: lambda f: strings[f.name], bool: lambda f: not f.default,
        int: lambda f: f.default * 2 + (1 << 20), float: lambda f: f.default + 1,
    }
    values = {key_of(f): different[type(f.default)](f) for f in ServerConfig.fields()}
    values["port"] = 9303
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    config, _ = serve_config(_write(tmp_path, text), NO_FLAGS, {})
    for f in ServerConfig.fields():
        assert getattr(config, f.name) != f.default, f.name


@pytest.mark.parametrize("text, says", [
    ('capcity = "1GiB"\n', "unknown key 'capcity' (did you mean 'capacity'?)"),
    ('max_value_bytes = "1MiB"\n', "unknown key 'max_value_bytes' (did you mean 'max-value-bytes'?)"),
    ("[server]\nport = 1\n", "unknown key 'server'"),
    ('port = "9201"\n', "key 'port': expected an integer, got a string"),
    ("port = 9201.5\n", "key 'port': expected an integer, got a float"),
    ('allow-insecure-bind = "yes"\n', "key 'allow-insecure-bind': expected true or false, got a string"),
    ("capacity = true\n", "key 'capacity': expected a byte count or a size string"),
    ('capacity = "lots"\n', "key 'capacity': not a size: 'lots'"),
    ("disk-capacity = -5\n", "key 'disk-capacity': not a size: '-5'"),
    ('auth-file = ["a", "b"]\n', "key 'auth-file': expected a string, got an array"),
    ('capacity = "1GiB\n', "is not valid TOML: "),
    # Values of the right type that the server still cannot use.
    ("port = 99999\n", "key 'port': port must be 0..65535, got 99999"),
    ("capacity = 10\n", "key 'capacity': capacity must be at least 1MiB, got 10 bytes"),
    ('eviction = "fifo"\n', "key 'eviction': eviction must be one of"),
    ("idle-timeout = 0\n", "key 'idle-timeout': idle_timeout must be > 0"),
])
def test_a_mistake_in_the_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, says):
    path = _write(tmp_path, text)
    assert main(["serve", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"membrain serve: config file {path}") and says in err


def test_a_bad_value_is_blamed_on_the_file_only_where_the_files_value_is_in_use(tmp_path, capsys):
    path = _write(tmp_path, "port = 99999\n")
    assert main(["serve", "--config", path, "--port", "99998"]) == 2  # the flag's value is the one refused
    assert capsys.readouterr().err == "membrain serve: port must be 0..65535, got 99998\n"
    assert serve_config(path, NO_FLAGS, {"MEMBRAIN_PORT": "9305"})[0].port == 9305  # the file's value is unused


def test_a_missing_file_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.toml")
    assert main(["serve", "--config", missing]) == 2
    assert capsys.readouterr().err == f"membrain serve: cannot read config file {missing}: No such file or directory\n"


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    path = _write(tmp_path, "port = 9201\nmax-connections = false\n")
    r = subprocess.run([sys.executable, "-m", "membrain_async.cli", "serve", "--config", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"membrain serve: config file {path}: key 'max-connections': expected an integer, got a boolean\n"


def test_check_config_reads_the_auth_file_and_certificate_without_starting(tmp_path, capsys):
    certs = make_certs(tmp_path)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"tokens": [{"token": "tenant-a-secret", "namespaces": ["a"]}]}))
    path = _write(tmp_path, f'host = "0.0.0.0"\nauth-file = "{auth}"\ntls-cert = "{certs.cert_file}"\n'
                            f'tls-key = "{certs.key_file}"\n')
    assert main(["serve", "--config", path, "--check-config"]) == 0
    assert capsys.readouterr().out == f"membrain serve: configuration OK ({path})\n"

    auth.write_text('{"tokens": [{"token": "short", "namespaces": ["a"]}]}')
    assert main(["serve", "--config", path, "--check-config"]) == 2
    assert "'token' must be a string of at least 8 characters" in capsys.readouterr().err

    auth.write_text(json.dumps({"tokens": [{"token": "tenant-a-secret", "namespaces": ["a"]}]}))
    (tmp_path / "server.pem").write_text("not a certificate")
    assert main(["serve", "--config", path, "--check-config"]) == 2
    assert "cannot load TLS certificate" in capsys.readouterr().err

    open_bind = _write(tmp_path, 'host = "0.0.0.0"\n', "open.toml")
    assert main(["serve", "--config", open_bind, "--check-config"]) == 2
    assert "refusing to listen on 0.0.0.0 without --auth-file" in capsys.readouterr().err


def test_a_served_file_reaches_the_running_server(tmp_path):
    path = _write(tmp_path, 'capacity = "48MiB"\nmax-batch-keys = 77\nport = 9\n')
    # --port 0 on top of the file's port: the flag wins, or this could not bind.
    proc = subprocess.Popen([*server_command({"port": 0}), "--config", path], stdout=subprocess.PIPE,
                            env={**os.environ, "MEMBRAIN_MAX_BATCH_KEYS": "99"})
    try:
        url = json.loads(proc.stdout.readline())["url"]
        limits = httpx.get(f"{url}/v1/info").json()["limits"]
        assert limits["capacity"] == 48 << 20 and limits["max_batch_keys"] == 99
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()


def test_the_deployment_guide_lists_every_key():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "deployment.md")) as f:
        assert keys_table() in f.read(), "paste keys_table() from server/config_file.py into docs/deployment.md"
