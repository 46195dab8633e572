"""The env-var activation path, on vLLM's real EngineArgs (no engine is started)."""

import pytest

pytest.importorskip("vllm")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("VLLM_MEMBRAIN_ENABLED", "VLLM_MEMBRAIN_ENDPOINT", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(k, "placeholder")  # recorded, so teardown restores whatever was there before
        monkeypatch.delenv(k)
    monkeypatch.setenv("VLLM_MEMBRAIN_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the self-check says so
    return monkeypatch


def test_activation_fills_kv_transfer_config_and_keeps_cpu_cores(clean_env):
    import os

    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

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

    clean_env.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "3")
    assert activate(EngineArgs(model="dummy"))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"


def test_another_connector_is_left_alone(clean_env):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from membrain_async.vllm.plugin import activate

    args = EngineArgs(model="dummy", kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both"))
    assert not activate(args)
    assert args.kv_transfer_config.kv_connector == "NixlConnector"
