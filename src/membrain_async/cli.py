"""`membrain` command line: serve | run | doctor | stats | config | bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import orjson

from .config import ConfigError, ConnectorConfig, ServerConfig, settings_table

RUN_DEFAULTS = {
    "VLLM_MEMBRAIN_ENABLED": "1",
    "VLLM_MEMBRAIN_ENDPOINT": "http://localhost:9201",
    "VLLM_MEMBRAIN_NAMESPACE": "default",
}


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    for f in ServerConfig.fields():
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} [env {f.metadata['env']}, default {f.default}]"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=help_)


def cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    from .server.app import MembrainServer, limit_malloc_retention

    overrides = {f.name: getattr(args, f.name) for f in ServerConfig.fields()}
    try:
        config = ServerConfig.from_sources(overrides=overrides)
    except ConfigError as exc:
        print(f"membrain serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    limit_malloc_retention()
    from . import telemetry

    telemetry.configure_from_env("membrain-server")  # OTEL_* variables: one span per request
    try:
        server = MembrainServer(config)
    except (ConfigError, ValueError) as exc:
        print(f"membrain serve: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            try:
                port = await tg.start(server.serve)
            except OSError as exc:
                print(f"membrain serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            if args.announce:
                # One JSON line on stdout: how embedders and `--endpoint-list` scripts learn the address.
                sys.stdout.write(orjson.dumps({"url": server.url, "port": port, "host": config.host}).decode() + "\n")
                sys.stdout.flush()
            else:
                print(f"membrain listening on {server.url}", file=sys.stderr)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    logging.getLogger("membrain.server").info("received %s, shutting down", signal.Signals(sig).name)
                    tg.cancel_scope.cancel()
                    break

    from .runtime.aio import loop_options

    anyio.run(main, backend=args.backend, backend_options=loop_options(args.backend))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import httpx

    from .protocol import api

    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        from .tls import client_context

        verify = client_context(args.ca_file) if args.endpoint.startswith("https://") else True
        r = httpx.get(args.endpoint.rstrip("/") + api.STATS_PATH, headers=headers, timeout=5, verify=verify)
    except httpx.HTTPError as exc:
        print(f"membrain stats: cannot reach {args.endpoint}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"membrain stats: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    print(orjson.dumps(r.json(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    try:
        cfg = ConnectorConfig.from_sources()
    except ConfigError as exc:
        print(f"membrain config: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(cfg.to_extra_config(), option=orjson.OPT_INDENT_2).decode())
    return 0


def run_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    for key, value in RUN_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("membrain run: give a command, e.g. membrain run -- python serve.py", file=sys.stderr)
        return 2
    try:
        os.execvpe(command[0], command, run_env())
    except FileNotFoundError:
        print(f"membrain run: command not found: {command[0]}", file=sys.stderr)
        return 127


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor

    return doctor(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(os.path.dirname(here)), "bench", "store_bench.py")
    if not os.path.exists(script):
        print("membrain bench: bench/store_bench.py not found (run from a source checkout)", file=sys.stderr)
        return 2
    sys.argv = [script, *args.rest]
    runpy.run_path(script, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membrain", description="Share vLLM prefix-cache blocks across a fleet.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a Membrain server")
    _add_server_flags(s)
    s.add_argument("--announce", action="store_true", help="print one JSON line {url, port, host} on stdout once listening")
    s.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"], help="event loop for the server")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("run", help="run a command with the VLLM_MEMBRAIN_* variables set (existing values kept)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(fn=cmd_run)

    st = sub.add_parser("stats", help="print a server's /v1/stats")
    st.add_argument("--endpoint", default=os.environ.get("VLLM_MEMBRAIN_ENDPOINT", "http://localhost:9201").split(",")[0])
    st.add_argument("--token", default=os.environ.get("VLLM_MEMBRAIN_TOKEN"))
    st.add_argument("--ca-file", default=os.environ.get("VLLM_MEMBRAIN_TLS_CA_FILE", ""),
                    help="PEM CA bundle for an https:// endpoint (default: the system trust store)")
    st.set_defaults(fn=cmd_stats)

    c = sub.add_parser("config", help="print the connector settings from the environment")
    c.add_argument("--markdown", action="store_true", help="print the table of every setting (as in the README)")
    c.set_defaults(fn=cmd_config)

    d = sub.add_parser("doctor", help="print a prompt's namespace fingerprint and block keys, and which a server holds")
    d.add_argument("--model", required=True, help="model path or name, as given to vLLM")
    d.add_argument("--prompt", required=True, help="prompt text (or @file)")
    d.add_argument("--block-size", type=int, default=None, help="vLLM block size (default: the platform's, 128 on CPU)")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--kv-cache-dtype", default="auto")
    d.add_argument("--tp-size", type=int, default=1)
    d.add_argument("--tp-rank", type=int, default=0)
    d.add_argument("--cache-salt", default=None)
    d.add_argument("--endpoint", default=os.environ.get("VLLM_MEMBRAIN_ENDPOINT", "http://localhost:9201"))
    d.add_argument("--namespace", default=os.environ.get("VLLM_MEMBRAIN_NAMESPACE", "default"))
    d.add_argument("--token", default=os.environ.get("VLLM_MEMBRAIN_TOKEN"))
    d.set_defaults(fn=cmd_doctor)

    b = sub.add_parser("bench", help="store benchmark (same as `nox -s bench`)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
