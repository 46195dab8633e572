"""`membrain doctor`: why do two instances not share? Print what keys a prompt maps to, and which a server holds.

It builds the same VllmConfig an engine with these flags would (no weights are loaded), computes the
namespace fingerprint and the block keys exactly as the connector does, and asks the server about them.
Run it with each instance's flags: different fingerprints name the setting that differs.

A mistake in the flags (a bad endpoint or namespace, a model that is not there, an unreadable prompt file)
is one line on stderr and exit status 2; a store that does not answer is exit status 1, and then no block is
called "missing": the keys are printed, what the store holds is unknown.
"""

from __future__ import annotations

import argparse
import sys

import anyio


class DoctorError(Exception):
    """A mistake in the doctor's flags: its message is the one line printed."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def doctor(args: argparse.Namespace) -> int:
    try:
        return _doctor(args)
    except DoctorError as exc:
        print(f"membrain doctor: {exc}", file=sys.stderr)
        return 2


def _read_prompt(prompt: str) -> str:
    if not prompt.startswith("@"):
        return prompt
    try:
        with open(prompt[1:]) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DoctorError(f"--prompt {prompt}: cannot read the file: {_one_line(exc)}") from None


def _doctor(args: argparse.Namespace) -> int:
    from . import keys
    from .client import MembrainUnavailable
    from .client.backends import open_client
    from .config import ConfigError, ConnectorConfig
    from .urls import redact_all

    prompt = _read_prompt(args.prompt)
    try:
        config = ConnectorConfig.from_sources(
            overrides={"endpoint": args.endpoint, "namespace": args.namespace, "token": args.token})
    except ConfigError as exc:
        raise DoctorError(str(exc)) from None

    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from .vllm.scheduler.blockhash import BlockHashes
    from .vllm.shared import identity

    engine_args = EngineArgs(
        model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tp_size,
        **({"block_size": args.block_size} if args.block_size is not None else {}),
    )
    try:
        vllm_config = engine_args.create_engine_config()
        from transformers import AutoTokenizer

        token_ids = AutoTokenizer.from_pretrained(args.model).encode(prompt)
    except (OSError, ValueError) as exc:  # no such model, or flags vLLM refuses for it
        raise DoctorError(f"--model {args.model}: {_one_line(exc)}") from None
    facts = identity.fingerprint_facts(vllm_config, config)
    fingerprint = keys.namespace_fingerprint(**facts)
    bs = vllm_config.cache_config.block_size

    # The connector's own hashing, on a real vLLM Request: the doctor cannot disagree with the engine.
    request = Request("doctor", token_ids, SamplingParams(max_tokens=1), None, cache_salt=args.cache_salt or None)
    hashes = BlockHashes(bs).extend(request, (len(token_ids) - 1) // bs)  # the last token is always computed
    rank = identity.rank_label(args.tp_rank, 0)
    block_keys = [keys.block_key(fingerprint, rank, h) for h in hashes]

    async def ask():
        # The connector's own client for this endpoint (Membrain node(s) or Redis: by the scheme).
        async with open_client(config) as c:
            try:
                return (await c.exists(block_keys) if block_keys else []), True
            except MembrainUnavailable:
                return [None] * len(block_keys), False

    try:
        present, reachable = anyio.run(ask)
    except ConfigError as exc:  # a backend that cannot load here (Redis without hiredis, Mooncake)
        raise DoctorError(str(exc)) from None
    print("namespace fingerprint:", fingerprint)
    for name, value in sorted(facts.items()):
        print(f"  {name:>10}: {value}")
    print(f"prompt: {len(token_ids)} tokens, block size {bs}: {len(block_keys)} loadable blocks")
    for i, (key, here) in enumerate(zip(block_keys, present)):
        print(f"  block {i:>3}  {'unknown' if here is None else 'stored ' if here else 'missing'}  {key}")
    if not reachable:
        print(f"membrain doctor: store {redact_all(config.endpoint)} is unreachable: cannot tell which blocks are "
              "stored", file=sys.stderr)
        return 1
    leading = 0
    while leading < len(present) and present[leading]:
        leading += 1
    print(f"stored: {sum(present)} of {len(block_keys)} blocks; a new request would load the first {leading} "
          f"({leading * bs} tokens) from namespace {config.namespace!r}")
    return 0
