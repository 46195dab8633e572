"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read bytes from outside the process:
the bulk frame reader, the HTTP front end's parsing and routing (h11 + protocol.api), the batch body
decoder, and the disk tier's record scanner and hint decoder (which read files a crash may have torn).

    python fuzz/atheris_fuzz.py --runs 25000 [--json bench/results/fuzz.json]     # every target, one process each
    python fuzz/atheris_fuzz.py --target disk -runs=1000                           # one target, libFuzzer flags

A target may refuse input only with its documented error (ProtocolError, RouteError, ValueError, h11's
RemoteProtocolError); any other exception, or a broken invariant, is a crash. The summary counts cases,
crashes and the coverage libFuzzer reports (edges, "cov", and features, "ft").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

TARGETS = ["frame", "http", "batch", "disk"]


def _target(name: str):
    import atheris

    with atheris.instrument_imports():
        import h11

        from membrain_async.protocol import api, bodies, bulk, heads
        from membrain_async.server import segments

    def frame(data: bytes) -> None:
        # Half the inputs start with a valid header prefix, so the fuzzer gets past the magic quickly.
        if data[:1] == b"\x00":
            data = bulk.MAGIC + data[1:]
        reader = bulk.FrameReader(max_head=1 << 16)
        rest = data
        try:
            while rest:
                frame_, rest = reader.feed(rest)
                if frame_ is None:
                    break
                try:
                    heads.decode_request(frame_)
                except bulk.ProtocolError:
                    pass
                if frame_.op == bulk.Op.GET:  # the same head read as the client reads a GET reply
                    keys = frame_.head.get("keys")
                    try:
                        heads.GetReply.from_frame(frame_, len(keys) if isinstance(keys, list) else 0)
                    except bulk.ProtocolError:
                        pass
        except bulk.ProtocolError:
            pass

    def http(data: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            conn.receive_data(data)
            for _ in range(8):
                event = conn.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Request):
                    method = event.method.decode("ascii", "replace")
                    target = event.target.decode("latin-1")
                    try:
                        route = api.match_route(method, target)
                        if route.name == "keys":
                            api.keys_limit(target)
                    except api.RouteError:
                        pass
        except h11.RemoteProtocolError:
            pass

    def batch(data: bytes) -> None:
        try:
            keys, values = api.decode_batch(data)
            assert len(keys) == len(values)
        except ValueError:
            pass
        try:
            bodies.KeysBody.from_json(data)
        except bulk.ProtocolError:
            pass

    def disk(data: bytes) -> None:
        out = segments.scan(data)  # never raises: a damaged segment is read as far as it can be trusted
        for r in out.records:
            assert r.offset % segments.ALIGN == 0 and r.value_offset + r.size <= len(data)
        assert out.end <= len(data)
        listed = segments.decode_hint(data, len(data) // 2)
        assert listed is None or all(isinstance(r, segments.Record) for r in listed)
        if out.records:  # a hint of what the scan found decodes back to exactly that
            assert segments.decode_hint(segments.encode_hint(len(data), out.records), len(data)) == out.records

    return {"frame": frame, "http": http, "batch": batch, "disk": disk}[name]


def _seeds(name: str, directory: str) -> None:
    """A few valid inputs per target, so the fuzzer starts from the formats rather than from nothing."""
    from membrain_async.protocol import api, bulk, heads
    from membrain_async.server import segments

    os.makedirs(directory, exist_ok=True)
    seeds = {
        "frame": [heads.encode_request(7, heads.PutRequest("n", ["a", "b"], [1, 2]), 3) + b"xyz",
                  # a GET request whose head also reads as a GET reply (sizes matching the body)
                  bulk.encode_frame(bulk.Op.GET, 1, {"ns": "n", "keys": ["a"], "sizes": [3]}, 3) + b"abc"],
        "http": [b"GET /v1/keys/ns?limit=5 HTTP/1.1\r\nhost: x\r\n\r\n",
                 b"PUT /memory/ns/k HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
                 b"POST /v1/lookup/ns HTTP/1.1\r\nhost: x\r\ncontent-length: 14\r\n\r\n{\"keys\":[\"a\"]}"],
        "batch": [b"".join(bytes(p) for p in api.encode_batch(["a", "b"], [b"1", None]))],
        "disk": [segments.encode_record(0, b"ns", b"k", b"v" * 100) + segments.encode_record(1, b"ns", b"k", b"")],
    }[name]
    for i, s in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(s)


def run_one(name: str, argv: list[str]) -> None:
    import atheris

    fn = _target(name)
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def run_all(runs: int, out_json: str | None, workdir: str) -> int:
    import importlib.util

    if importlib.util.find_spec("atheris") is None:
        print("atheris is not installed here (pip install atheris: wheels for CPython on x86-64 Linux); skipped")
        return 0
    summary = {"runs_per_target": runs, "targets": {}, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    failed = 0
    for name in TARGETS:
        corpus = os.path.join(workdir, name)
        _seeds(name, corpus)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--target", name, f"-runs={runs}",
                               f"-artifact_prefix={workdir}/crash-{name}-", corpus],
                              capture_output=True, text=True)
        log = proc.stderr
        done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)", log)
        last = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", log)
        cases, cov, ft = (int(x) for x in (done or last or [("0", "0", "0")])[-1])
        crashed = proc.returncode != 0
        failed += crashed
        summary["targets"][name] = {"cases": cases, "crashes": int(crashed), "cov_edges": cov, "features": ft,
                                    "seconds": round(time.perf_counter() - t0, 1)}
        if crashed:
            summary["targets"][name]["log_tail"] = log[-3000:]
        print(f"{name}: {cases} cases, {'CRASH' if crashed else 'no crash'}, coverage {cov} edges / {ft} features",
              flush=True)
    summary["total_cases"] = sum(t["cases"] for t in summary["targets"].values())
    summary["crashes"] = failed
    print(f"total: {summary['total_cases']} cases, {failed} crashes")
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=TARGETS)
    ap.add_argument("--runs", type=int, default=25000, help="cases per target (all-targets mode)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default="/tmp/membrain-fuzz")
    args, rest = ap.parse_known_args()
    if args.target:
        run_one(args.target, rest)
        return 0
    return run_all(args.runs, args.json, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
