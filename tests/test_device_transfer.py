"""Batched whole-page transfer (the CUDA path's logic) for every supported KV layout.

On CPU the mover runs without streams, which checks the layout handling here; on a CUDA machine the
same tests run on the GPU (pinned buffers, streams, events).
"""

import pytest
import torch

from membrain_async.vllm.device_transfer import DevicePageMover
from membrain_async.vllm.pages import PageLayout

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NB, LAYERS, HEADS, BS, HD = 24, 3, 2, 16, 32

LAYOUTS = {
    # CPU_ATTN: [num_blocks, kv_heads, block_size, 2*head_dim]
    "cpu": (lambda: (NB, HEADS, BS, 2 * HD), "cpu-pages"),
    # FlashAttention: [2, num_blocks, block_size, kv_heads, head_dim]
    "flash": (lambda: (2, NB, BS, HEADS, HD), "cuda-pages"),
    # FlashInfer / cross-layer style: [num_blocks, 2, block_size, kv_heads, head_dim]
    "flashinfer": (lambda: (NB, 2, BS, HEADS, HD), "cuda-pages"),
}


def caches(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(shape, generator=g).to(torch.bfloat16).to(device) for i in range(LAYERS)}


def page(kv: torch.Tensor, layout: PageLayout, layer: int, b: int) -> torch.Tensor:
    return layout.block_major[layer][b].cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_roundtrip_exact_for_partial_and_growing_batches(device, layout_name):
    shape_fn, tag = LAYOUTS[layout_name]
    src_kv, dst_kv = caches(shape_fn(), device, 0), caches(shape_fn(), device, 1)
    src = PageLayout.from_kv_caches(src_kv, NB, tag)
    dst = PageLayout.from_kv_caches(dst_kv, NB, tag)
    mover_src, mover_dst = DevicePageMover(src, torch.device(device)), DevicePageMover(dst, torch.device(device))
    for src_ids, dst_ids in ([[3, 7, 1], [5, 0, 2]], [[9], [23]], [list(range(10, 22)), list(range(12))]):
        saved = mover_src.start_save(src_ids, [f"h{b}" for b in src_ids], "req")
        saved.event.synchronize()
        assert saved.ready()
        # The host bytes are the payload layout: [layers, *page] per block, as the CPU path writes.
        for i, b in enumerate(src_ids):
            payload = mover_src.payload_of(saved, i).view(torch.bfloat16).view(len(src.layer_names), *src.page_shape)
            for layer in range(LAYERS):
                assert torch.equal(payload[layer], page(src_kv, src, layer, b))
        loaded = mover_dst.start_load(dst_ids, saved.host)
        for name in dst.layer_names:
            mover_dst.wait_layer(loaded, name)
        if device == "cuda":
            torch.cuda.synchronize()
        for s, d in zip(src_ids, dst_ids):
            for layer in range(LAYERS):
                assert torch.equal(page(dst_kv, dst, layer, d), page(src_kv, src, layer, s))
        mover_src.release_host(saved.host)
    untouched = set(range(NB)) - {5, 0, 2, 23, *range(12)}
    fresh = caches(shape_fn(), device, 1)
    fresh_layout = PageLayout.from_kv_caches(fresh, NB, tag)
    for b in untouched:
        assert torch.equal(page(dst_kv, dst, 0, b), page(fresh, fresh_layout, 0, b))


@pytest.mark.parametrize("device", DEVICES)
def test_stage_packs_fetched_payloads_back_to_back(device):
    kv = caches(LAYOUTS["cpu"][0](), device, 2)
    layout = PageLayout.from_kv_caches(kv, NB, "cpu-pages")
    mover = DevicePageMover(layout, torch.device(device))
    payloads = [torch.stack([layout.block_major[layer][b].cpu() for layer in range(LAYERS)]) for b in (4, 6)]
    host = mover.stage(payloads)
    size = layout.payload_bytes
    assert torch.equal(host[:size].view(torch.bfloat16), payloads[0].reshape(-1))
    assert torch.equal(host[size : 2 * size].view(torch.bfloat16), payloads[1].reshape(-1))
