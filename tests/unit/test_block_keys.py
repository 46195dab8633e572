"""Block keys from real vLLM Request objects: every isolation of vLLM's prefix cache holds, seeds do not matter."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from membrain_async import keys  # noqa: E402
from membrain_async.vllm.scheduler.blockhash import BlockHashes  # noqa: E402

BS = 16
TOKENS = list(range(100, 100 + 4 * BS + 5))


def request(tokens=TOKENS, **kw) -> Request:
    return Request("r", list(tokens), SamplingParams(max_tokens=4), None, **kw)


def hashes(req: Request) -> list[str]:
    return BlockHashes(BS).extend(req, 100)


def image(identifier: str, offset: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier, mm_position=PlaceholderRange(offset=offset, length=8))


def test_full_blocks_only_and_chained():
    h = hashes(request())
    assert len(h) == 4
    assert h[0] == keys.chain_hash(None, TOKENS[:BS]).hex()
    assert h[1] == keys.chain_hash(bytes.fromhex(h[0]), TOKENS[BS : 2 * BS]).hex()
    # A change in block 0 changes every later block; a change in block 3 only block 3.
    changed = hashes(request([1] + TOKENS[1:]))
    assert all(a != b for a, b in zip(h, changed))
    late = hashes(request(TOKENS[: 3 * BS] + [7] + TOKENS[3 * BS + 1 :]))
    assert late[:3] == h[:3] and late[3] != h[3]


def test_cache_salt_isolates_every_block():
    plain, a, b = hashes(request()), hashes(request(cache_salt="alice")), hashes(request(cache_salt="bob"))
    assert not set(plain) & set(a) and not set(a) & set(b)
    assert hashes(request(cache_salt="alice")) == a


def test_lora_adapters_isolate_and_repointed_names_too():
    plain = hashes(request())
    l1 = hashes(request(lora_request=LoRARequest("sql", 1, "/adapters/sql-v1")))
    l2 = hashes(request(lora_request=LoRARequest("chat", 2, "/adapters/chat")))
    moved = hashes(request(lora_request=LoRARequest("sql", 1, "/adapters/sql-v2")))
    assert len({tuple(plain), tuple(l1), tuple(l2), tuple(moved)}) == 4
    assert not set(plain) & set(l1)


def test_multimodal_inputs_isolate_from_their_block_on():
    cat = hashes(request(mm_features=[image("cat-image-hash", offset=2 * BS + 3)]))
    dog = hashes(request(mm_features=[image("dog-image-hash", offset=2 * BS + 3)]))
    shifted = hashes(request(mm_features=[image("cat-image-hash", offset=2 * BS + 4)]))
    plain = hashes(request())
    # Blocks before the image are shared; the block holding it and all after differ.
    assert cat[:2] == dog[:2] == plain[:2]
    assert cat[2] != dog[2] and cat[3] != dog[3] and cat[2] != plain[2] and cat[2] != shifted[2]


def test_decode_tokens_extend_the_chain():
    req = request(TOKENS[: 2 * BS + 10])
    chain = BlockHashes(BS)
    assert len(chain.extend(req, 10)) == 2
    req.append_output_token_ids(list(range(6)))
    assert len(chain.extend(req, 10)) == 3


def test_keys_do_not_depend_on_pythonhashseed():
    code = (
        "from membrain_async import keys; "
        "print(keys.chain_hash(None, range(64), (('cache_salt', 's'), ('lora', 'a', '/p'))).hex())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("0", "1", "random")
    }
    assert len(outs) == 1


def test_fingerprint_changes_with_every_fact():
    base = dict(model="m", dtype="bfloat16", kv_dtype="auto", block_size=128, layout="cpu-pages", tp_size=1)
    fp = keys.namespace_fingerprint(**base)
    for k, v in [("model", "m2"), ("dtype", "float16"), ("kv_dtype", "fp8"), ("block_size", 16), ("layout", "cuda-pages"), ("tp_size", 2)]:
        assert keys.namespace_fingerprint(**{**base, k: v}) != fp


def test_model_files_digest_reads_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 1000)
    d1 = keys.model_files_digest(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"b" * 1000)
    assert keys.model_files_digest(str(tmp_path)) != d1
    assert keys.model_files_digest("org/not-a-local-dir") == "remote"
