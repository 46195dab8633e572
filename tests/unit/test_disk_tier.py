"""The disk tier and restarts: real `membrain serve` processes on loopback, real files, no mocks.

No timing thresholds: every check is about what is served (always the bytes that were put, or a miss),
what the disk holds and what the counters say.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrain_async.client import MembrainClient
from membrain_async.server import segments
from membrain_async.server.embed import start_subprocess_server

SCALE = float(os.environ.get("MEMBRAIN_FUZZ_SCALE", "1"))
VALUE = 256 << 10
RAM = 16 << 20


def _values(n: int, tag: str) -> dict[str, bytes]:
    # Distinct, checkable payloads without paying os.urandom for every byte.
    return {f"{tag}-{i}": (i.to_bytes(4, "little") + os.urandom(60)) * (VALUE // 64) for i in range(n)}


def _serve(disk: str, log: str, **extra):
    cfg = {"port": 0, "capacity": RAM, "disk_path": disk, "disk_capacity": "256MiB", **extra}
    return start_subprocess_server(cfg, log_path=log)


def _tiers(srv) -> dict:
    return httpx.get(srv.url + "/v1/stats").json()["tiers"]


async def _put_all(url: str, values: dict[str, bytes], batch: int = 8) -> None:
    keys = list(values)
    async with MembrainClient(url, timeout=10) as c:
        for i in range(0, len(keys), batch):
            assert await c.put_many(keys[i : i + batch], [values[k] for k in keys[i : i + batch]]) == len(keys[i : i + batch])


async def _served(url: str, values: dict[str, bytes]) -> tuple[int, int]:
    """(values served and equal to what was put, values served wrong). A miss is neither."""
    ok = wrong = 0
    keys = list(values)
    async with MembrainClient(url, timeout=10) as c:
        for i in range(0, len(keys), 8):
            for k, got in zip(keys[i : i + 8], await c.get_many(keys[i : i + 8])):
                if got is not None:
                    ok += bytes(got) == values[k]
                    wrong += bytes(got) != values[k]
    return ok, wrong


def _segment_files(disk: str) -> list[str]:
    return sorted(os.path.join(disk, n) for n in os.listdir(disk) if n.endswith(".mbs"))


# --- the record format (sans-IO) -------------------------------------------------------------------


def _record(ns: bytes, key: bytes, value: bytes, kind: int = segments.VALUE) -> bytes:
    return segments.encode_record(kind, ns, key, value)


def test_records_scan_back_and_a_torn_tail_is_ignored():
    image = _record(b"ns", b"a", b"1" * 100) + _record(b"ns", b"b", b"") + _record(b"ns", b"a", b"", segments.TOMBSTONE)
    whole = segments.scan(image)
    assert [(r.key, r.kind, r.size) for r in whole.records] == [("a", 0, 100), ("b", 0, 0), ("a", 1, 0)]
    assert image[whole.records[0].value_offset : whole.records[0].value_offset + 100] == b"1" * 100
    torn = segments.scan(image + _record(b"ns", b"c", b"x" * 50)[:-7])
    assert len(torn.records) == 3 and torn.torn and torn.end == len(image)


def test_a_corrupt_header_is_skipped_and_the_next_record_found():
    first, second = _record(b"ns", b"a", b"1" * 64), _record(b"ns", b"b", b"2" * 64)
    bad = bytearray(first)
    bad[12] ^= 0xFF  # inside the header: its checksum fails
    out = segments.scan(bytes(bad) + second)
    assert [r.key for r in out.records] == ["b"] and out.corrupt == 1


@settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=8))
def test_scan_of_arbitrary_or_damaged_bytes_never_raises_and_never_invents_a_record(prefix, flips):
    good = _record(b"ns", b"k", b"v" * 40)
    image = bytearray(prefix + good)
    for pos, val in flips:
        if pos < len(image):
            image[pos] = val
    out = segments.scan(bytes(image))
    for r in out.records:  # any record found has a header whose checksum matched: its lengths are in bounds
        assert r.offset + segments.HEADER_BYTES + r.size <= len(image)


# --- a working set four times RAM --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_working_set_four_times_ram_is_served_from_both_tiers(tmp_path, backend):
    disk = str(tmp_path / "disk")
    values = _values(4 * RAM // VALUE, "w")
    srv = _serve(disk, str(tmp_path / "server.log"), backend=backend)
    try:
        anyio.run(_put_all, srv.url, values)
        async def lookups():
            async with MembrainClient(srv.url, timeout=10) as c:
                return await c.lookup(list(values)), await c.exists(list(values))
        count, present = anyio.run(lookups)
        assert count == len(values) and all(present)  # both tiers answer lookups
        ok, wrong = anyio.run(_served, srv.url, values)
        tiers = _tiers(srv)
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    rate = ok / len(values)
    print(f"working set 4x RAM: hit rate {rate:.1%} ({ok}/{len(values)}); tiers {tiers}")
    assert wrong == 0 and rate >= 0.95
    assert tiers["ram"]["evictions"] > 0 and tiers["disk"]["hits"] > 0 and tiers["disk"]["bytes"] <= tiers["disk"]["capacity"]
    assert 'membrain_tier_hits_total{tier="disk"}' in metrics and 'membrain_tier_bytes{tier="ram"}' in metrics


# --- restarts ------------------------------------------------------------------------------------


def test_sigterm_flushes_ram_and_a_restart_serves_everything(tmp_path):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    values = _values(48, "t")  # 12 MiB: it all fits in RAM, so only the shutdown flush can put all of it on disk
    srv = _serve(disk, log)
    anyio.run(_put_all, srv.url, values)
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=30) == 0
    srv.stop()
    srv = _serve(disk, log)
    try:
        recovered = _tiers(srv)["disk"]["recovered_keys"]

        async def lookup():
            async with MembrainClient(srv.url, timeout=10) as c:
                return await c.lookup(list(values))

        assert anyio.run(lookup) == len(values)
        # The lookup starts reading the prefix back (up to a quarter of RAM) ahead of the gets.
        deadline = time.monotonic() + 30
        while _tiers(srv)["disk"]["prefetched"] < RAM // 4 // VALUE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok, wrong = anyio.run(_served, srv.url, values)
        tiers = _tiers(srv)
        # The HTTP API sees the disk tier too (HEAD, GET of a value only the disk holds after a promotion
        # evicted it are the same code paths as the bulk ones above).
        key = list(values)[0]
        assert httpx.head(f"{srv.url}/memory/default/{key}").headers["content-length"] == str(VALUE)
        assert httpx.get(f"{srv.url}/memory/default/{key}").content == values[key]
        assert httpx.delete(f"{srv.url}/memory/default/{key}").status_code == 204
    finally:
        srv.stop()
    assert (ok, wrong, recovered) == (len(values), 0, len(values))
    assert tiers["ram"]["hits"] >= RAM // 4 // VALUE and tiers["ram"]["hits"] + tiers["disk"]["hits"] == len(values)


def test_sigkill_mid_put_flood_then_restart_serves_only_true_values(tmp_path, reliability):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    values = _values(160, "k")  # 40 MiB through a 16 MiB RAM tier
    srv = _serve(disk, log)
    acked: dict[str, bytes] = {}

    async def flood():
        keys = list(values)
        async with MembrainClient(srv.url, timeout=5, retries=0) as c:
            for i in range(0, len(keys), 4):
                batch = keys[i : i + 4]
                if i == len(keys) // 2:
                    srv.process.kill()  # a crash in the middle of the flood, with writes in flight
                try:
                    await c.put_many(batch, [values[k] for k in batch])
                except Exception:
                    return
                acked.update({k: values[k] for k in batch})

    anyio.run(flood)
    srv.process.wait()
    srv.stop()
    srv = _serve(disk, log)
    try:
        ok, wrong = anyio.run(_served, srv.url, values)  # every key ever sent, acknowledged or not
    finally:
        srv.stop()
    fraction = ok / max(1, len(acked))
    print(f"SIGKILL mid flood: {len(acked)} puts acknowledged, {ok} served after the restart ({fraction:.1%}), {wrong} wrong")
    reliability.add("restart", test="SIGKILL mid put flood", acknowledged=len(acked), served=ok, wrong=wrong)
    assert wrong == 0 and ok > 0


def test_hints_list_what_a_scan_finds():
    image = b"".join(segments.encode_record(0, b"ns", f"k{i}".encode(), bytes(i * 1000)) for i in range(5))
    found = segments.scan(image).records
    hint = segments.encode_hint(len(image), found)
    assert segments.decode_hint(hint, len(image)) == found
    assert segments.decode_hint(hint, len(image) + 1) is None  # the segment grew or shrank: scan it instead
    assert segments.decode_hint(hint[:-1], len(image)) is None and segments.decode_hint(b"", 0) is None


def test_corrupt_and_torn_records_are_misses_never_wrong_bytes(tmp_path):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    values = _values(24, "c")
    srv = _serve(disk, log)
    anyio.run(_put_all, srv.url, values)
    srv.stop()  # SIGTERM: everything on disk
    (path,) = _segment_files(disk)
    image = bytearray(open(path, "rb").read())
    recs = segments.scan(bytes(image)).records
    flipped = recs[3]
    image[flipped.value_offset + 1000] ^= 0x01  # one bit of one value
    last = recs[-1]
    with open(path, "wb") as f:
        f.write(image[: last.value_offset + 100])  # the last record cut short, as by a crash
    srv = _serve(disk, log)
    try:
        ok, wrong = anyio.run(_served, srv.url, values)
        disk_stats = _tiers(srv)["disk"]
    finally:
        srv.stop()
    assert wrong == 0 and ok == len(values) - 2
    assert disk_stats["misses_corrupt"] == 1 and disk_stats["recovered_torn_segments"] == 1


# --- a full or failing disk ------------------------------------------------------------------------


def test_a_small_disk_tier_stays_within_its_capacity_and_never_fails_a_client(tmp_path):
    disk = str(tmp_path / "disk")
    values = _values(128, "f")  # 32 MiB through 16 MiB of RAM and 8 MiB of disk
    srv = _serve(disk, str(tmp_path / "server.log"), disk_capacity="8MiB")
    try:
        anyio.run(_put_all, srv.url, values)
        ok, wrong = anyio.run(_served, srv.url, dict(list(values.items())[-64:]))
        tiers = _tiers(srv)
        on_disk = sum(os.path.getsize(os.path.join(disk, n)) for n in os.listdir(disk))  # segments and hints
    finally:
        srv.stop()
    assert wrong == 0 and ok > 0
    assert on_disk <= 8 << 20 and tiers["disk"]["used"] <= 8 << 20 and tiers["disk"]["segments_reclaimed"] > 0
    assert tiers["disk"]["state"] == "ok"


def _serve_cli(*flags):
    return subprocess.run([sys.executable, "-m", "membrain_async.cli", "serve", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=60)


def test_an_unwritable_disk_path_refuses_to_start_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    r = _serve_cli("--disk-path", str(blocker / "disk"), "--disk-capacity", "8MiB")
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line.startswith("membrain serve: ")
    assert str(blocker / "disk") in line and "--allow-degraded" in line


def test_an_unwritable_disk_path_with_allow_degraded_serves_from_ram_and_is_not_ready(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    log = str(tmp_path / "server.log")
    values = _values(8, "u")
    srv = _serve(str(blocker / "disk"), log, allow_degraded=True)
    try:
        anyio.run(_put_all, srv.url, values)
        ok, wrong = anyio.run(_served, srv.url, values)
        state = _tiers(srv)["disk"]["state"]
        alive, ready = httpx.get(srv.url + "/healthz"), httpx.get(srv.url + "/readyz")
    finally:
        srv.stop()
    assert (ok, wrong, state) == (len(values), 0, "degraded")
    assert "serving from RAM only" in open(log).read()
    assert alive.status_code == 200  # liveness: the process serves
    assert ready.status_code == 503 and ready.json()["status"] == "degraded" and "a-file" in ready.json()["reason"]


def test_a_disk_capacity_beyond_the_free_space_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    r = _serve_cli("--disk-path", str(tmp_path / "disk"), "--disk-capacity", str(free * 2))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "disk_capacity" in r.stderr and "free" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _puts_never_fail_and_ram_serves(srv, log: str, values: dict[str, bytes]) -> None:
    """After the disk failed: every put succeeds, the latest values are served right, the tier says so."""
    anyio.run(_put_all, srv.url, values)  # raises if a put fails
    ok, wrong = anyio.run(_served, srv.url, dict(list(values.items())[-32:]))
    assert (ok, wrong, _tiers(srv)["disk"]["state"]) == (32, 0, "degraded")
    assert "serving from RAM only" in open(log).read()
    ready = httpx.get(srv.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "degraded"


def test_a_disk_that_goes_away_mid_run_degrades_to_ram_only(tmp_path):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    srv = _serve(disk, log, disk_capacity="8MiB")  # 1 MiB segments: a new file is opened every few values
    try:
        anyio.run(_put_all, srv.url, _values(16, "before"))
        shutil.move(disk, str(tmp_path / "moved"))
        with open(disk, "wb") as f:  # the path is now a file: no segment can be created there
            f.write(b"x")
        _puts_never_fail_and_ram_serves(srv, log, _values(96, "after"))
    finally:
        srv.stop()


@pytest.fixture
def full_filesystem(tmp_path):
    """A 4 MiB tmpfs: a disk tier given more capacity than the filesystem has runs into a real ENOSPC."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_filesystem_that_fills_up_degrades_to_ram_only_and_no_client_sees_an_error(tmp_path, full_filesystem):
    disk, log = os.path.join(full_filesystem, "disk"), str(tmp_path / "server.log")
    srv = _serve(disk, log, disk_capacity="3MiB")  # fits the 4 MiB filesystem at start...
    try:
        with open(os.path.join(full_filesystem, "filler"), "wb") as f:  # ...until something else fills it
            f.write(b"\0" * (3 << 20))
        _puts_never_fail_and_ram_serves(srv, log, _values(96, "full"))  # 24 MiB
    finally:
        srv.stop()


def test_disk_flags_are_checked_with_clear_messages(tmp_path):
    def serve(*flags):
        return subprocess.run([sys.executable, "-m", "membrain_async.cli", "serve", *flags],
                              capture_output=True, text=True, timeout=60)

    r = serve("--disk-path", str(tmp_path))
    assert r.returncode == 2 and "disk-capacity" in r.stderr
    r = serve("--disk-capacity", "1GiB")
    assert r.returncode == 2 and "--disk-path" in r.stderr
    r = serve("--disk-path", str(tmp_path), "--disk-capacity", "many")
    assert r.returncode == 2 and "disk_capacity" in r.stderr


def test_concurrent_gets_of_disk_resident_values_read_each_once_and_all_verify(tmp_path):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    values = _values(16, "m")
    srv = _serve(disk, log)
    anyio.run(_put_all, srv.url, values)
    srv.stop()
    srv = _serve(disk, log)  # RAM empty, all 16 on disk
    try:
        results: list[tuple[int, int]] = []

        async def many():
            async def one():
                results.append(await _served(srv.url, values))

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(one)

        anyio.run(many)
        disk_stats = _tiers(srv)["disk"]
    finally:
        srv.stop()
    assert results == [(16, 0)] * 6
    assert disk_stats["read_bytes"] == 16 * VALUE  # six clients at once, yet every value was read from disk once


def test_a_deleted_value_stays_deleted_across_a_restart(tmp_path):
    disk, log = str(tmp_path / "disk"), str(tmp_path / "server.log")
    values = _values(4, "del")
    srv = _serve(disk, log)
    anyio.run(_put_all, srv.url, values)
    srv.stop()
    srv = _serve(disk, log)
    gone = list(values)[1]
    assert httpx.delete(f"{srv.url}/memory/default/{gone}").status_code == 204  # on disk only: a tombstone
    srv.stop()
    srv = _serve(disk, log)
    try:
        assert httpx.get(f"{srv.url}/memory/default/{gone}").status_code == 404
        ok, wrong = anyio.run(_served, srv.url, {k: v for k, v in values.items() if k != gone})
    finally:
        srv.stop()
    assert (ok, wrong) == (3, 0)


def test_peak_rss_stays_bounded_under_a_put_flood_with_the_disk_tier(tmp_path, reliability):
    from ..harness import proc_status

    capacity = 96 << 20
    srv = _serve(str(tmp_path / "disk"), str(tmp_path / "server.log"), capacity=capacity, disk_capacity="1GiB")
    try:
        anyio.run(_put_all, srv.url, _values(3 * capacity // VALUE, "rss"))
        peak = proc_status(srv.process.pid, "VmHWM")
    finally:
        srv.stop()
    limit = capacity * 1.10 + (64 << 20)
    reliability.add("memory", test="put flood of 3x capacity with the disk tier", capacity=capacity, peak_rss=peak,
                    limit=int(limit))
    assert peak < limit


def test_a_value_evicted_while_its_disk_write_is_pending_is_served_from_ram(tmp_path):
    """Evicted values wait in their RAM slots for the disk writer. Until it has written them, `exists` says
    they are stored, so a get must serve them from those slots, not miss. The service here runs without its
    writer task, so the evicted values stay pending for the whole test."""
    from membrain_async.config import ServerConfig
    from membrain_async.server.service import Service

    values = _values(5, "spill")
    keys = list(values)

    async def main() -> None:
        svc = Service(ServerConfig(capacity=4 * VALUE, disk_path=str(tmp_path / "disk"), disk_capacity=64 << 20))
        for k in keys[:4]:
            assert await svc.put_values("default", [k], [values[k]]) == [True]
        async with anyio.create_task_group() as tg:
            # The fifth put evicts the first value; with no writer it waits for room, then gives up.
            tg.start_soon(svc.put_values, "default", [keys[4]], [values[keys[4]]])
            await anyio.wait_all_tasks_blocked()
            assert svc.disk.spilled("default", keys[0]) is not None
            assert svc.exists(None, "default", [keys[0]]) == [True]
            hits = svc.store.stats()["namespaces"]["default"]["hits"]
            entries = await svc.get_entries(None, "default", [keys[0]])
            try:
                assert entries[0] is not None and bytes(entries[0].view) == values[keys[0]]
            finally:
                svc.unpin_all(entries)
            assert svc.store.stats()["namespaces"]["default"]["hits"] == hits + 1
            tg.cancel_scope.cancel()

    anyio.run(main)
