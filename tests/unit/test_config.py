import pytest

from membrain_async.config import ConfigError, ConnectorConfig, ServerConfig, parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("1000", 1000), ("7b", 7),
        # Redis's rule: a bare letter is decimal, with "b" it is binary; case does not matter.
        ("1k", 1000), ("1kb", 1024), ("1m", 10**6), ("1MB", 1 << 20), ("2g", 2 * 10**9), ("2GB", 2 << 30),
        ("1t", 10**12), ("1tb", 1 << 40),
        ("64MiB", 64 << 20), ("1.5GiB", 3 << 29), ("1TiB", 1 << 40), ("1_000", 1000), ("2e3", 2000),
    ],
)
def test_sizes_follow_one_rule(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "1/2", "inf", "nan", "1e400", "10 apples", ""])
def test_what_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_env_then_overrides():
    cfg = ServerConfig.from_sources(env={"MEMBRAIN_PORT": "1234", "MEMBRAIN_CAPACITY": "1GiB"}, overrides={"port": "99"})
    assert cfg.port == 99 and cfg.capacity == 1 << 30


def test_connector_defaults_and_lists():
    cfg = ConnectorConfig.from_sources(env={})
    assert not cfg.enabled and cfg.endpoint == ("http://localhost:9201",) and cfg.namespace == "default"
    cfg = ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": "http://a:1, http://b:2"})
    assert cfg.enabled and cfg.endpoint == ("http://a:1", "http://b:2")
    again = ConnectorConfig.from_sources(env={}, overrides=cfg.to_extra_config())
    assert again == cfg


@pytest.mark.parametrize(
    "env, name",
    [
        ({"VLLM_MEMBRAIN_ASYNC_BACKEND": "curio"}, "ASYNC_BACKEND"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "localhost:9201"}, "ENDPOINT"),
        ({"VLLM_MEMBRAIN_NAMESPACE": "a b"}, "NAMESPACE"),
        ({"VLLM_MEMBRAIN_ENABLED": "maybe"}, "ENABLED"),
        ({"VLLM_MEMBRAIN_TIMEOUT": "0"}, "timeout"),
        ({"VLLM_MEMBRAIN_TIMEOUT": "nan"}, "TIMEOUT"),
        # Mistakes in the URL itself: found here, never reported as a store that is "unreachable now".
        ({"VLLM_MEMBRAIN_ENDPOINT": "http://[::1"}, "not a valid URL"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "http://host:99999"}, "Port out of range"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "http://host:0"}, "port 0"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "redis://host:6379/99x"}, "database number"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "redis+cluster://host:6379/3"}, "only database 0"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "mooncake://"}, "no host"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "http://:9201"}, "no host"),
    ],
)
def test_bad_settings_name_the_setting(env, name):
    with pytest.raises(ConfigError, match=name):
        ConnectorConfig.from_sources(env=env)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"log_level": "loud"}, "log_level"),
        ({"host": "[::1]"}, "without brackets"),
        ({"idle_timeout": "inf"}, "finite"),
        ({"capacity": "1e400"}, "capacity"),
    ],
)
def test_bad_server_settings_name_the_setting(overrides, name):
    with pytest.raises(ConfigError, match=name):
        ServerConfig.from_sources(env={}, overrides=overrides)


def test_secrets_are_never_shown():
    env = {
        "VLLM_MEMBRAIN_ENDPOINT": "redis://alice:url-secret@host:6379",
        "VLLM_MEMBRAIN_TOKEN": "token-secret",
        "VLLM_MEMBRAIN_REDIS_PASSWORD": "password-secret",
    }
    shown = ConnectorConfig.from_sources(env=env).shown()
    assert "secret" not in repr(shown)
    assert shown["endpoint"] == "redis://alice:***@host:6379" and shown["token"] == shown["redis_password"] == "***"
    # A value that fails to parse is quoted in the error, but not its password.
    with pytest.raises(ConfigError) as err:
        ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "redis://alice:url-secret@host:99999"})
    assert "url-secret" not in str(err.value) and "alice:***@host" in str(err.value)
