"""The env-var activation path, on vLLM's real EngineArgs (no engine is started)."""

import pytest

pytest.importorskip("vllm")


@pytest.fixture
def clean_env(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    # register() wraps this method for the whole process: put the original back after each test.
    monkeypatch.setattr(EngineArgs, "create_engine_config", EngineArgs.create_engine_config)
    for k in ("VLLM_MEMBRAIN_ENABLED", "VLLM_MEMBRAIN_ENDPOINT", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_MEMBRAIN_STRICT",
              "VLLM_MEMBRAIN_ROLE"):
        monkeypatch.setenv(k, "placeholder")  # recorded, so teardown restores whatever was there before
        monkeypatch.delenv(k)
    monkeypatch.setenv("VLLM_MEMBRAIN_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the self-check says so
    return monkeypatch


def test_activation_fills_kv_transfer_config_and_keeps_cpu_cores(clean_env):
    import os

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    clean_env.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    args = EngineArgs(model="dummy", tensor_parallel_size=1)
    assert activate(args)
    cfg = args.kv_transfer_config
    assert cfg.kv_connector == "MembrainConnector" and cfg.kv_load_failure_policy == "recompute"
    assert cfg.kv_connector_extra_config["endpoint"] == "http://127.0.0.1:9"
    # vLLM on CPU would reserve one more core for a connector; Membrain needs none.
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def test_an_explicit_core_reservation_wins(clean_env):
    import os

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    clean_env.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    clean_env.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "3")
    assert activate(EngineArgs(model="dummy"))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"


def test_another_connector_is_left_alone(clean_env):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    clean_env.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    args = EngineArgs(model="dummy", kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both"))
    assert not activate(args)
    assert args.kv_transfer_config.kv_connector == "NixlConnector"


def test_without_the_variable_or_the_flag_nothing_is_set_up(clean_env):
    import os

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    args = EngineArgs(model="dummy")
    assert not activate(args)
    assert args.kv_transfer_config is None and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ


def explicit_config(role: str = "kv_both", **extra):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="MembrainConnector", kv_role=role, kv_load_failure_policy="recompute",
                            kv_connector_extra_config={"endpoint": "http://127.0.0.1:9", **extra})


def test_an_explicit_kv_transfer_config_gets_the_same_set_up_without_the_variable(clean_env, caplog):
    """The start-up line with the server check and memory room, and vLLM's CPU cores kept as without a
    connector (on 2 cores the extra reservation left 2 OMP threads and changed greedy tokens)."""
    import logging
    import os

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    clean_env.delenv("VLLM_MEMBRAIN_ENDPOINT")  # the endpoint comes from the flag's extra config alone
    args = EngineArgs(model="dummy", kv_transfer_config=explicit_config())
    with caplog.at_level(logging.INFO, logger="membrain"):
        assert activate(args)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    line = next(r.getMessage() for r in caplog.records if "active (explicit" in r.getMessage())
    assert "endpoint http://127.0.0.1:9" in line and "server unreachable" in line
    assert "worker buffers at most" in line


@pytest.mark.parametrize("flag_role", ["kv_both", "kv_consumer"])
def test_the_role_variable_sets_vllms_kv_role_on_both_paths(clean_env, flag_role):
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    clean_env.setenv("VLLM_MEMBRAIN_ROLE", "producer")
    explicit = EngineArgs(model="dummy", kv_transfer_config=explicit_config(flag_role))
    assert activate(explicit)
    assert explicit.kv_transfer_config.kv_role == "kv_producer"
    clean_env.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    by_env = EngineArgs(model="dummy")
    assert activate(by_env)
    assert by_env.kv_transfer_config.kv_role == "kv_producer"


def test_the_flags_kv_role_stands_without_the_variable(clean_env):
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    args = EngineArgs(model="dummy", kv_transfer_config=explicit_config("kv_consumer"))
    assert activate(args)
    assert args.kv_transfer_config.kv_role == "kv_consumer"


def test_membrains_variables_pass_vllms_strict_environment_check(clean_env, monkeypatch):
    """--fail-on-environ-validation refuses any VLLM_* name vLLM's table lacks; the plugin adds exactly ours."""
    from vllm import envs
    from vllm.platforms import current_platform

    from membrain_async.vllm import environ, plugin

    plugin.register()
    for name in environ.names():
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("VLLM_MEMBRAIN_TOKEN", "s3cret-token")
    current_platform.validate_environ(True)  # raises ValueError on an unknown name
    assert {"VLLM_MEMBRAIN_ENABLED", "VLLM_MEMBRAIN_ENDPOINT", "VLLM_MEMBRAIN_LOAD_MODE", "VLLM_USE_V1"} <= set(environ.names())
    # vLLM hashes every known variable's value into its compile cache key: ours must not be in it.
    assert "s3cret-token" not in repr(envs.compile_factors())
    monkeypatch.setenv("VLLM_MEMBRAIN_NO_SUCH_SETTING", "1")  # a typo is still vLLM's to report
    with pytest.raises(ValueError, match="VLLM_MEMBRAIN_NO_SUCH_SETTING"):
        current_platform.validate_environ(True)


# --- fail clearly: a Membrain mistake never stops vLLM, unless VLLM_MEMBRAIN_STRICT=1 asks it to ---------------


class _Records(list):
    """Membrain's log records (the plugin forwards them to vLLM's logger, which does not propagate)."""

    def __init__(self):
        super().__init__()
        import logging

        self.handler = logging.Handler()
        self.handler.emit = self.append

    def errors(self):
        import logging

        return [r.getMessage() for r in self if r.levelno >= logging.ERROR]


@pytest.fixture
def activation(clean_env, model):
    """register() as vLLM runs it; a real model's engine config is then built as LLM(...) builds it (no
    engine starts)."""
    import logging

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm import plugin

    records = _Records()
    logging.getLogger("membrain").addHandler(records.handler)

    def build(**env):
        for name, value in env.items():
            clean_env.setenv(name, value)
        plugin.register()
        return EngineArgs(model=model).create_engine_config()

    yield build, records
    logging.getLogger("membrain").removeHandler(records.handler)


@pytest.mark.parametrize(
    "env, named",
    [
        ({"VLLM_MEMBRAIN_ENDPOINT": "http://[::1"}, "VLLM_MEMBRAIN_ENDPOINT"),
        ({"VLLM_MEMBRAIN_ENDPOINT": "redis://u:pw-secret@host:99999"}, "Port out of range"),
        ({"VLLM_MEMBRAIN_NAMESPACE": "a b"}, "VLLM_MEMBRAIN_NAMESPACE"),
        ({"VLLM_MEMBRAIN_ENABLED": "maybe"}, "VLLM_MEMBRAIN_ENABLED"),
    ],
)
def test_a_bad_setting_leaves_vllm_plain_and_says_why_once(activation, env, named):
    import os

    build, records = activation
    config = build(**{"VLLM_MEMBRAIN_ENABLED": "1", **env})
    assert config.kv_transfer_config is None  # plain vLLM: no connector
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    (line,) = records.errors()
    assert named in line and "plain vLLM" in line and "secret" not in line


def test_strict_start_stops_on_a_bad_setting(activation):
    from membrain_async.vllm.plugin import MembrainStartError

    build, records = activation
    with pytest.raises(MembrainStartError, match="VLLM_MEMBRAIN_ENDPOINT"):
        build(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT="http://[::1", VLLM_MEMBRAIN_STRICT="1")
    assert len(records.errors()) == 1


@pytest.mark.parametrize("scheme", ["http", "redis", "mooncake"])
def test_strict_start_stops_on_an_unreachable_store_and_plain_start_goes_on(activation, scheme):
    import socket

    from membrain_async.vllm.plugin import MembrainStartError

    if scheme == "redis":
        pytest.importorskip("hiredis")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"{scheme}://127.0.0.1:{s.getsockname()[1]}"
    build, records = activation
    config = build(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=endpoint)
    assert config.kv_transfer_config.kv_connector == "MembrainConnector" and not records.errors()
    with pytest.raises(MembrainStartError, match="unreachable"):
        build(VLLM_MEMBRAIN_STRICT="1")


def test_strict_start_goes_on_with_a_server_that_answers(activation, server):
    build, records = activation
    config = build(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=server.url, VLLM_MEMBRAIN_STRICT="1")
    assert config.kv_transfer_config.kv_connector == "MembrainConnector" and not records.errors()


def test_an_explicit_membrain_config_with_a_bad_setting_becomes_plain_vllm(clean_env):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    explicit = KVTransferConfig(kv_connector="MembrainConnector", kv_role="kv_both",
                                kv_connector_extra_config={"endpoint": "http://host:99999"})
    args = EngineArgs(model="dummy", kv_transfer_config=explicit)
    assert not activate(args)
    assert args.kv_transfer_config is None


def test_an_explicit_membrain_config_with_a_bad_setting_stops_a_strict_start(clean_env):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import MembrainStartError, activate

    explicit = KVTransferConfig(kv_connector="MembrainConnector", kv_role="kv_both",
                                kv_connector_extra_config={"endpoint": "http://host:99999", "strict": "1"})
    with pytest.raises(MembrainStartError, match="Port out of range"):
        activate(EngineArgs(model="dummy", kv_transfer_config=explicit))


@pytest.mark.parametrize("strict", ["0", "1"])
def test_the_connector_of_an_explicit_config_with_a_bad_setting_is_inert_unless_strict(clean_env, model, strict):
    """A process where the plugin did not set the config up (vLLM loaded without it, or the config was
    pickled to a process that builds the connector as given): the connector itself is inert, or refuses
    under strict. (With the plugin, activation already drops such a config: the test above.)"""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from membrain_async.config import ConfigError
    from membrain_async.vllm.connector import MembrainConnector

    explicit = KVTransferConfig(kv_connector="MembrainConnector", kv_role="kv_both",
                                kv_connector_extra_config={"endpoint": "http://host:99999", "strict": strict})
    vllm_config = EngineArgs(model=model).create_engine_config()
    vllm_config.kv_transfer_config = explicit
    kv_cache_config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[])
    if strict == "1":
        with pytest.raises(ConfigError, match="Port out of range"):
            MembrainConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
        return
    connector = MembrainConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
    assert connector.get_num_new_matched_tokens(None, 0) == (0, False)  # plain vLLM: never a hit
