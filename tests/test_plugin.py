"""The env-var activation path, on vLLM's real EngineArgs (no engine is started)."""

import pytest

pytest.importorskip("vllm")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("VLLM_MEMBRAIN_ENABLED", "VLLM_MEMBRAIN_ENDPOINT", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_MEMBRAIN_ROLE"):
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
