"""What Membrain holds in memory on a vLLM host, and the room it leaves for it.

A worker's Membrain bytes are bounded by settings, each its own pool:
- write-behind: pages copied out for saving, staged until their step's verdict, queued, uploading
  (`VLLM_MEMBRAIN_WRITE_BEHIND_BYTES`, enforced by the worker's StagingPool);
- prefetch staging (`VLLM_MEMBRAIN_PREFETCH_BYTES`, the runtime);
- in-flight loads: what one step fetches (`VLLM_MEMBRAIN_STEP_LOAD_BYTES`, the scheduler grants no more);
- the hot tier (`VLLM_MEMBRAIN_LOCAL_CACHE_BYTES`);
- with a mooncake:// endpoint, Mooncake's transfer buffer and any segment this process lends the store
  (`VLLM_MEMBRAIN_MOONCAKE_LOCAL_BUFFER_SIZE`, `VLLM_MEMBRAIN_MOONCAKE_GLOBAL_SEGMENT_SIZE`).

vLLM on CPU sizes its KV cache from memory: `gpu_memory_utilization` of the host's memory, less what the
worker already uses. A Membrain server on the same host grows to its `--capacity` later, and the worker's
buffers fill under load; neither is there when vLLM measures. The plugin lowers the fraction by both, so
the host is not overcommitted (measured: vLLM's benchmark client against such a host had the worker
OOM-killed). Pure functions: unit-tested without an engine.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import ConnectorConfig

GiB = 1 << 30
MiB = 1 << 20
# Below this fraction vLLM's KV cache would be too small to serve anything: say so instead of shrinking.
MIN_FRACTION = 0.05


def worker_buffers(config: ConnectorConfig) -> dict[str, int]:
    """Upper bounds of the bytes Membrain holds in one worker (one per TP/PP rank), by pool."""
    out = {
        "write-behind": config.write_behind_bytes,
        "prefetch": config.prefetch_bytes,
        "step loads": config.step_load_bytes,
        "hot tier": config.local_cache_bytes,
    }
    if config.endpoint[0].startswith("mooncake://"):
        # Mooncake's client allocates its transfer buffer, and any segment it lends the store, at setup.
        out["mooncake buffer"] = config.mooncake_local_buffer_size
        out["mooncake segment"] = config.mooncake_global_segment_size
    return out


def describe_buffers(config: ConnectorConfig) -> str:
    parts = worker_buffers(config)
    detail = ", ".join(f"{name} {mib(n)}" for name, n in parts.items() if n)
    return f"worker buffers at most {mib(sum(parts.values()))} per rank ({detail})"


def is_local_endpoint(url: str) -> bool:
    """Does this endpoint's host name a server on this machine (loopback or one of its own addresses)?"""
    host = urlsplit(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own = {"0.0.0.0", "::"}
    try:
        own |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in own for a in addrs)


@dataclass(frozen=True)
class KvRoom:
    fraction: float  # the gpu_memory_utilization to use
    reserved: int  # bytes left out of vLLM's KV auto-size for Membrain
    message: str
    fits: bool


def plan_kv_room(fraction: float, total_memory: int, local_server_capacity: int, buffers_per_rank: int,
                 ranks: int) -> KvRoom:
    """Lower vLLM-on-CPU's memory fraction by a local server's capacity and every rank's buffers."""
    reserved = local_server_capacity + buffers_per_rank * ranks
    wanted = fraction - reserved / total_memory
    what = (f"{gib(reserved)} left for Membrain (local server capacity {gib(local_server_capacity)}, "
            f"buffers {mib(buffers_per_rank)} x {ranks} rank(s))")
    if wanted < MIN_FRACTION:
        return KvRoom(fraction, 0, f"CANNOT leave {what}: vLLM's KV cache would be under {MIN_FRACTION:.0%} of "
                      f"{gib(total_memory)}; the host may run out of memory. Lower the server's --capacity or "
                      f"the VLLM_MEMBRAIN_*_BYTES settings, or set VLLM_CPU_KVCACHE_SPACE", False)
    wanted = round(wanted, 4)
    return KvRoom(wanted, reserved, f"CPU KV auto-size: memory fraction {fraction:g} -> {wanted:g}, {what}", True)


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
