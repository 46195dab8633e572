"""Sizes the host cannot give are refused at start, rather than found out at the OOM killer or at ENOSPC."""

from __future__ import annotations

import os

from ..config import ConfigError, ServerConfig

_CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def host_memory() -> int:
    """Bytes of memory this process may use: the host's, or its cgroup's limit where that is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max" (v2) means none
            total = min(total, int(limit))
    return total


def disk_room(directory: str) -> int:
    """Bytes a disk tier in `directory` (which exists) could fill: the file system's free space plus the
    files already there (a restart reopens its own segments, which count against its capacity)."""
    existing = sum(e.stat().st_size for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize + existing


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_memory(config: ServerConfig) -> None:
    memory = host_memory()
    if config.capacity > memory:
        raise ConfigError(f"capacity of {config.capacity} bytes ({_gib(config.capacity)}) is more than this host's "
                          f"memory ({_gib(memory)}): give a smaller --capacity")


def check_disk(config: ServerConfig) -> None:
    """For a disk tier that opened (its directory exists and takes writes)."""
    room = disk_room(config.disk_path)
    if config.disk_capacity > room:
        raise ConfigError(f"disk_capacity of {config.disk_capacity} bytes ({_gib(config.disk_capacity)}) is more "
                          f"than {config.disk_path} has free ({_gib(room)}): give a smaller --disk-capacity")
