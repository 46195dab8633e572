"""Membrain's variables, known to vLLM's environment table.

vLLM warns about every VLLM_* variable its table (`vllm.envs.environment_variables`) does not list, and
with --fail-on-environ-validation refuses to start. The plugin adds Membrain's names to that table in
every process, before vLLM checks the environment (plugins load in EngineArgs' __post_init__).

Their getters return None rather than the value: Membrain reads its settings itself (config.py), and
vLLM hashes every getter's value into its torch.compile cache key (`envs.compile_factors`, written to
cache_key_factors.json), which an endpoint must not invalidate and a token must never be written into.
"""

from __future__ import annotations

# vLLM 0.32 has only the v1 engine and no longer knows this name. Membrain no longer sets it, but users'
# scripts written for older vLLMs may: it must not be what stops a strict start.
ACCEPTED_LEGACY = ("VLLM_USE_V1",)


def _read_by_membrain() -> None:
    return None


def names() -> list[str]:
    from ..config import ConnectorConfig

    return [f.metadata["env"] for f in ConnectorConfig.fields()] + list(ACCEPTED_LEGACY)


def register() -> None:
    from vllm import envs

    for name in names():
        envs.environment_variables.setdefault(name, _read_by_membrain)
