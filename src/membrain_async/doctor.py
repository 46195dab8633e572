"""`membrain doctor`: why do two instances not share? Print what keys a prompt maps to, and which a server holds.

It builds the same VllmConfig an engine with these flags would (no weights are loaded), computes the
namespace fingerprint and the block keys exactly as the connector does, and asks the server about them.
Run it with each instance's flags: different fingerprints name the setting that differs.
"""

from __future__ import annotations

import argparse
import sys

import anyio


def doctor(args: argparse.Namespace) -> int:
    from vllm.engine.arg_utils import EngineArgs

    from . import keys
    from .client import MembrainUnavailable
    from .client.backends import open_client
    from .config import ConnectorConfig
    from .urls import redact_all
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from .vllm import identity
    from .vllm.blockhash import BlockHashes

    prompt = open(args.prompt[1:]).read() if args.prompt.startswith("@") else args.prompt
    engine_args = EngineArgs(
        model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tp_size,
        **({"block_size": args.block_size} if args.block_size else {}),
    )
    vllm_config = engine_args.create_engine_config()
    config = ConnectorConfig.from_sources(overrides={"endpoint": args.endpoint, "namespace": args.namespace, "token": args.token})
    facts = identity.fingerprint_facts(vllm_config, config)
    fingerprint = keys.namespace_fingerprint(**facts)
    bs = vllm_config.cache_config.block_size

    from transformers import AutoTokenizer

    token_ids = AutoTokenizer.from_pretrained(args.model).encode(prompt)
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
                return [False] * len(block_keys), False

    present, reachable = anyio.run(ask)
    print("namespace fingerprint:", fingerprint)
    for name, value in sorted(facts.items()):
        print(f"  {name:>10}: {value}")
    print(f"prompt: {len(token_ids)} tokens, block size {bs}: {len(block_keys)} loadable blocks")
    if not reachable:
        print(f"store {redact_all(config.endpoint)} is unreachable: cannot tell which blocks are stored", file=sys.stderr)
    leading = 0
    while leading < len(present) and present[leading]:
        leading += 1
    for i, (key, here) in enumerate(zip(block_keys, present)):
        print(f"  block {i:>3}  {'stored ' if here else 'missing'}  {key}")
    print(f"stored: {sum(present)} of {len(block_keys)} blocks; a new request would load the first {leading} "
          f"({leading * bs} tokens) from namespace {config.namespace!r}")
    return 0 if reachable else 1
