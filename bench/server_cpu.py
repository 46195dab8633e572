"""Is one Python thread the bound on puts? The server's CPU time (utime + stime from /proc) over a few seconds
of 1 MiB puts into a full store, as a fraction of one core, beside the put rate.

    python bench/server_cpu.py [--seconds 3]

Well below 100 % means the server thread waits for the client and the loopback copy, not the other way round.
"""

from __future__ import annotations

import argparse
import os
import time

import anyio

from membrain_async.client import MembrainClient
from membrain_async.server.embed import start_subprocess_server


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    for batch in (1, 8):
        srv = start_subprocess_server({"port": 0, "capacity": "1GiB"})

        async def run() -> None:
            async with MembrainClient(srv.url, timeout=30) as c:
                payload, i = os.urandom(1 << 20), 0
                for _ in range(1100 // batch):  # past the capacity first: measured full and evicting
                    await c.put_many([f"f{i}-{j}" for j in range(batch)], [payload] * batch)
                    i += 1
                c0, t0, n = cpu_seconds(srv.process.pid), time.perf_counter(), 0
                while time.perf_counter() - t0 < args.seconds:
                    await c.put_many([f"k{i}-{j}" for j in range(batch)], [payload] * batch)
                    i, n = i + 1, n + batch
                dt = time.perf_counter() - t0
                used = cpu_seconds(srv.process.pid) - c0
                print(f"1 MiB x{batch}, store full: {n * (1 << 20) / dt / 1e9:.2f} GB/s, "
                      f"server CPU {used / dt:.0%} of one core (load average {os.getloadavg()[0]:.1f})")

        try:
            anyio.run(run)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
