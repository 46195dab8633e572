"""`membrain` command line: serve | run | doctor | stats | config | bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import orjson

from . import __version__
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
    from .server.config_file import check_files, serve_config

    flags = {f.name: getattr(args, f.name) for f in ServerConfig.fields()}
    try:
        config, path = serve_config(args.config, flags, os.environ)
        if args.check_config:
            check_files(config)
    except ConfigError as exc:
        return _fail("serve", exc)
    if args.check_config:
        print(f"membrain serve: configuration OK{f' ({path})' if path else ''}")
        return 0
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    limit_malloc_retention()
    from . import telemetry

    telemetry.configure_from_env("membrain-server")  # OTEL_* variables: one span per request
    try:
        server = MembrainServer(config)
    except (ConfigError, ValueError) as exc:
        return _fail("serve", exc)
    try:
        server.bind()  # before the event loop: a port in use is one line, not an exception out of a task group
    except OSError as exc:
        return _fail("serve", f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            if args.announce:
                # One JSON line on stdout: how embedders and `--endpoint-list` scripts learn the address.
                sys.stdout.write(orjson.dumps({"url": server.url, "port": port, "host": config.host}).decode() + "\n")
                sys.stdout.flush()
            else:
                print(f"membrain listening on {server.url}", file=sys.stderr)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        server.reload()
                        continue
                    logging.getLogger("membrain.server").info("received %s, shutting down", signal.Signals(sig).name)
                    tg.cancel_scope.cancel()
                    break

    from .runtime.aio import loop_options

    anyio.run(main, backend=args.backend, backend_options=loop_options(args.backend))
    return 0


def _fail(command: str, reason: object, status: int = 2) -> int:
    """The one line a mistake gets: what is wrong, never a traceback."""
    print(f"membrain {command}: {reason}", file=sys.stderr)
    return status


def cmd_stats(args: argparse.Namespace) -> int:
    import httpx

    from .protocol import api
    from .urls import check_endpoint, redact_url

    try:
        check_endpoint(args.endpoint)
    except ValueError as exc:
        return _fail("stats", f"--endpoint: {exc}")
    if not args.endpoint.startswith(("http://", "https://")):
        return _fail("stats", f"--endpoint {redact_url(args.endpoint)!r}: stats come from a Membrain server (http:// or https://)")
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    from .tls import client_context

    try:
        verify = client_context(args.ca_file) if args.endpoint.startswith("https://") else True
    except (ValueError, OSError) as exc:
        return _fail("stats", f"--ca-file {args.ca_file}: {exc}")
    try:
        r = httpx.get(args.endpoint.rstrip("/") + api.STATS_PATH, headers=headers, timeout=5, verify=verify)
    except httpx.HTTPError as exc:
        return _fail("stats", f"cannot reach {redact_url(args.endpoint)}: {exc}", 1)
    if r.status_code != 200:
        return _fail("stats", f"{r.status_code} {r.text}", 1)
    try:
        stats = r.json()
    except ValueError:
        return _fail("stats", f"{redact_url(args.endpoint)} answered {api.STATS_PATH} with no JSON: not a Membrain server?", 1)
    print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    try:
        cfg = ConnectorConfig.from_sources()
    except ConfigError as exc:
        return _fail("config", exc)
    print(orjson.dumps(cfg.shown(), option=orjson.OPT_INDENT_2).decode())
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
        return _fail("run", "give a command, e.g. membrain run -- python serve.py")
    try:
        os.execvpe(command[0], command, run_env())
    except FileNotFoundError:
        return _fail("run", f"command not found: {command[0]}", 127)
    except PermissionError:
        return _fail("run", f"not executable: {command[0]}", 126)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor

    return doctor(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import types

    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(os.path.dirname(here)), "bench", "store_bench.py")
    if not os.path.exists(script):
        return _fail("bench", "bench/store_bench.py not found (run from a source checkout)")
    with open(script) as fh:
        code = compile(fh.read(), script, "exec")
    # Run as __main__ the way runpy.run_path does (its spawned workers find the script by __file__), but with
    # argv[0] left as given, which run_path would set to the script's path: argparse takes its prog from it,
    # so usage and errors name the command that was typed.
    main_module = types.ModuleType("__main__")
    main_module.__file__ = script
    saved = sys.modules["__main__"]
    sys.modules["__main__"], sys.argv = main_module, ["membrain bench", *args.bench_args]
    try:
        exec(code, main_module.__dict__)
    finally:
        sys.modules["__main__"] = saved
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membrain", description="Share vLLM prefix-cache blocks across a fleet.")
    p.add_argument("--version", action="version", version=f"membrain {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a Membrain server")
    _add_server_flags(s)
    s.add_argument("--config", metavar="FILE", help="TOML file of these settings, keys as the flags without '--' "
                   "(env MEMBRAIN_CONFIG); environment variables and flags override it")
    s.add_argument("--check-config", action="store_true",
                   help="check the settings, auth file and TLS certificate, then exit (0: they would start)")
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
    c.add_argument("--markdown", action="store_true", help="print the table of every setting (as in docs/configuration.md)")
    c.set_defaults(fn=cmd_config)

    d = sub.add_parser("doctor", help="print a prompt's namespace fingerprint and block keys, and which a server holds")
    d.add_argument("--model", required=True, help="model path or name, as given to vLLM")
    d.add_argument("--prompt", required=True, help="prompt text (or @file)")
    d.add_argument("--block-size", type=_positive_int, default=None,
                   help="vLLM block size (default: the platform's, 128 on CPU)")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--kv-cache-dtype", default="auto")
    d.add_argument("--tp-size", type=_positive_int, default=1)
    d.add_argument("--tp-rank", type=int, default=0)
    d.add_argument("--cache-salt", default=None)
    d.add_argument("--endpoint", default=os.environ.get("VLLM_MEMBRAIN_ENDPOINT", "http://localhost:9201"))
    d.add_argument("--namespace", default=os.environ.get("VLLM_MEMBRAIN_NAMESPACE", "default"))
    d.add_argument("--token", default=os.environ.get("VLLM_MEMBRAIN_TOKEN"))
    d.set_defaults(fn=cmd_doctor)

    # Every option after `bench` is the bench's own (bench/store_bench.py; `membrain bench --help` lists them).
    b = sub.add_parser("bench", help="the store benchmark, bench/store_bench.py (one part of `nox -s bench`); --help for its options", add_help=False)
    b.set_defaults(fn=cmd_bench)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        status = args.fn(args) or 0
        sys.stdout.flush()  # here, so that a reader that went away is noticed inside the try
    except BrokenPipeError:
        # `membrain stats | head`: the reader has what it wanted. Quiet, as a killed-by-SIGPIPE tool is.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return status


if __name__ == "__main__":
    sys.exit(main())
