"""Both page movers (CPU, and the device path's logic) for every supported KV layout: pages gathered into
payload slots and scattered back, exactly, one copy per layer.

On CPU the device mover runs without streams, which checks its layout handling here; on a CUDA machine the
same tests run on the GPU (pinned buffers, streams, events).
"""

import pytest
import torch

from membrain_async import codec
from membrain_async.vllm.worker.movers import CpuPageMover, DevicePageMover
from membrain_async.vllm.worker.pages import PageLayout

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


def movers(layout: PageLayout, device: str):
    if device == "cpu":
        return {"cpu": CpuPageMover(layout), "device": DevicePageMover(layout, torch.device("cpu"))}
    return {"device": DevicePageMover(layout, torch.device(device))}


def slot_pages(mover, host: torch.Tensor, i: int, layout: PageLayout) -> torch.Tensor:
    """Slot i's pages, as a `[layers, *page]` tensor (after its header room)."""
    raw = torch.frombuffer(mover.slot(host, i), dtype=torch.uint8)[codec.HEADER_SIZE:]
    return raw.view(layout.dtype).view(len(layout.layer_names), *layout.page_shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["cpu", "device"])
def test_roundtrip_exact_for_partial_and_growing_batches(device, layout_name, kind):
    shape_fn, tag = LAYOUTS[layout_name]
    if kind not in movers(PageLayout.from_kv_caches(caches(shape_fn(), "cpu", 0), NB, tag), device):
        pytest.skip("the CPU mover serves CPU caches only")
    src_kv, dst_kv = caches(shape_fn(), device, 0), caches(shape_fn(), device, 1)
    src = PageLayout.from_kv_caches(src_kv, NB, tag)
    dst = PageLayout.from_kv_caches(dst_kv, NB, tag)
    mover_src, mover_dst = movers(src, device)[kind], movers(dst, device)[kind]
    # Scattered ids (more runs than MAX_RUNS: indexed copies), single blocks, and runs (slice copies).
    for src_ids, dst_ids in ([[3, 7, 1], [5, 0, 2]], [[9], [23]], [list(range(10, 22)), list(range(12))],
                             [[1, 3, 5, 7, 9, 11, 13, 15, 17, 19], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]],
                             [[20, 21, 22, 4, 5], [13, 14, 15, 16, 1]]):
        host, copied = mover_src.start_save(src_ids)
        copied.synchronize()
        assert copied.query()
        # Each slot holds the block's payload: [layers, *page], after room for its header.
        for i, b in enumerate(src_ids):
            for layer in range(LAYERS):
                assert torch.equal(slot_pages(mover_src, host, i, src)[layer], page(src_kv, src, layer, b))
        mover_dst.load(dst_ids, host)
        if device == "cuda":
            torch.cuda.synchronize()
        for s, d in zip(src_ids, dst_ids):
            for layer in range(LAYERS):
                assert torch.equal(page(dst_kv, dst, layer, d), page(src_kv, src, layer, s))
        mover_src.release_host(host)
    untouched = set(range(NB)) - {5, 0, 2, 23, *range(12), *range(2, 21, 2), 13, 14, 15, 16, 1}
    fresh = caches(shape_fn(), device, 1)
    fresh_layout = PageLayout.from_kv_caches(fresh, NB, tag)
    for b in untouched:
        assert torch.equal(page(dst_kv, dst, 0, b), page(fresh, fresh_layout, 0, b))


def test_a_load_copies_only_the_leading_slots_it_is_given():
    kv = caches(LAYOUTS["cpu"][0](), "cpu", 2)
    layout = PageLayout.from_kv_caches(kv, NB, "cpu-pages")
    mover = CpuPageMover(layout)
    host, _ = mover.start_save([4, 6, 8])
    before = {b: page(kv, layout, 0, b).clone() for b in (10, 11, 12)}
    mover.load([10, 11], host)  # the third slot (a failed block) is not copied
    assert torch.equal(page(kv, layout, 0, 10), page(kv, layout, 0, 4))
    assert torch.equal(page(kv, layout, 0, 11), page(kv, layout, 0, 6))
    assert torch.equal(page(kv, layout, 0, 12), before[12])


def test_host_buffers_are_pooled_best_fit_within_their_bound():
    layout = PageLayout.from_kv_caches(caches(LAYOUTS["cpu"][0](), "cpu", 3), NB, "cpu-pages")
    slot = CpuPageMover(layout).slot_bytes
    mover = CpuPageMover(layout, pool_bytes=40 * slot)
    a = mover.host_buffer(2)
    assert a.numel() == 4 * slot  # sized to the batch, in whole quanta of slots
    mover.release_host(a)
    assert mover.host_buffer(3) is a  # reused: no fresh memory, no page faults
    assert mover.allocated == 1
    big = mover.host_buffer(30)
    assert big.numel() == 32 * slot and mover.allocated == 2
    mover.release_host(a)
    mover.release_host(big)
    assert mover.host_buffer(20) is big  # the smallest free buffer that fits
    assert mover.host_buffer(1) is a
    mover.release_host(big)
    assert mover.host_buffer(1) is not big  # over twice the batch: kept for a larger one
    assert mover.allocated == 3


def test_the_pool_keeps_free_buffers_within_its_bytes_with_those_in_use():
    layout = PageLayout.from_kv_caches(caches(LAYOUTS["cpu"][0](), "cpu", 3), NB, "cpu-pages")
    slot = CpuPageMover(layout).slot_bytes
    mover = CpuPageMover(layout, pool_bytes=40 * slot)
    small, big, held = mover.host_buffer(4), mover.host_buffer(32), mover.host_buffer(8)
    mover.release_host(small)  # 4 free beside 40 in use: over the bound, so it is not kept
    mover.release_host(big)  # 32 free beside 8 in use: kept
    assert mover.host_buffer(4) is not small
    mover.release_host(held)
    assert mover.host_buffer(30) is big  # the large one stayed


def test_a_load_takes_the_prefaulted_buffer_whatever_its_size_and_a_save_does_not():
    layout = PageLayout.from_kv_caches(caches(LAYOUTS["cpu"][0](), "cpu", 3), NB, "cpu-pages")
    slot = CpuPageMover(layout).slot_bytes
    mover = CpuPageMover(layout, pool_bytes=64 * slot)
    mover.prefault(32)  # what the worker does at start-up, for a whole step's loads
    assert mover.allocated == 1
    small_save = mover.host_buffer(2)
    assert small_save.numel() == 4 * slot and mover.allocated == 2  # over twice its batch: not for a save
    load = mover.host_buffer(2, any_size=True)
    assert load.numel() == 32 * slot and mover.allocated == 2  # a load takes it: no fresh memory
    assert not load.any()  # faulted in by writing it
    mover.release_host(load)
    assert mover.host_buffer(30, any_size=True) is load


def test_a_buffer_the_host_cannot_give_leaves_the_pool_as_it_was():
    layout = PageLayout.from_kv_caches(caches(LAYOUTS["cpu"][0](), "cpu", 3), NB, "cpu-pages")

    class NoMemory(CpuPageMover):
        def _new_host(self, nbytes):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")

    mover = NoMemory(layout)
    with pytest.raises(RuntimeError):
        mover.prefault(8)
    assert mover.allocated == 0 and mover._out == 0
