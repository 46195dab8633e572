import pytest

from membrain_async.config import ConfigError, ConnectorConfig, ServerConfig, parse_size


def test_sizes():
    assert parse_size("64MiB") == 64 << 20 and parse_size("2g") == 2 << 30 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


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
    ],
)
def test_bad_settings_name_the_setting(env, name):
    with pytest.raises(ConfigError, match=name):
        ConnectorConfig.from_sources(env=env)
