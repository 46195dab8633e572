"""Save/load GB/s of the batched device page mover, beside pinned memcpy measured in the same run.

Llama-3-8B-shaped KV cache: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks, FlashAttention
layout [2, num_blocks, 16, 8, 128] per layer; batches of 256 and 4096 tokens.

    python bench/device_transfer_bench.py            # on a CUDA host (on CPU it runs, for a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from membrain_async.vllm.worker.movers import DevicePageMover
from membrain_async.vllm.worker.pages import PageLayout

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def timed(fn, sync, repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    max_tokens = 4096
    num_blocks = 2 * max_tokens // BLOCK
    kv = {f"model.layers.{i}.self_attn.attn": torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device).to(torch.bfloat16)
          for i in range(LAYERS)}
    layout = PageLayout.from_kv_caches(kv, num_blocks, "cuda-pages")
    mover = DevicePageMover(layout, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), payload {layout.payload_bytes / 2**20:.1f} MiB per block")
    for tokens in (256, 4096):
        n = tokens // BLOCK
        nbytes = n * layout.payload_bytes
        ids = torch.randperm(num_blocks)[:n].tolist()  # scattered blocks, as a real cache has them
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        d2h = timed(lambda: host.copy_(dev, non_blocking=cuda), sync, args.repeats)
        h2d = timed(lambda: dev.copy_(host, non_blocking=cuda), sync, args.repeats)

        def save():
            saved, copied = mover.start_save(ids)
            copied.synchronize()
            mover.release_host(saved)

        src = mover.host_buffer(n)  # slots (header room + pages), as loads receive them

        def load():
            mover.load(ids, src)

        t_save = timed(save, sync, args.repeats)
        t_load = timed(load, sync, args.repeats)
        gb = nbytes / 1e9
        print(
            f"{tokens:>5} tokens ({nbytes / 2**20:.0f} MiB): pinned D2H {gb / d2h:.1f} GB/s, H2D {gb / h2d:.1f} GB/s | "
            f"save {gb / t_save:.1f} GB/s ({d2h / t_save:.2f}x pinned) | load {gb / t_load:.1f} GB/s ({h2d / t_load:.2f}x pinned)",
            flush=True,
        )


if __name__ == "__main__":
    main()
