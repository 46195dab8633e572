"""Mistakes at the command line: one line naming the mistake, exit status 2, never a traceback.

Every case runs the real `membrain` command as a subprocess (a second server on a port in use, a real
closed pipe, a real model for doctor).
"""

import os
import socket
import subprocess
import sys

import pytest

from membrain_async import __version__
from membrain_async.server.host_fit import host_memory


def membrain(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "membrain_async.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def the_error(r, command: str) -> str:
    """The one line `membrain <command>:` printed, with no traceback anywhere."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"membrain {command}:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--log-level", "loud"], "log_level"),
        (["--port", "99999"], "port"),
        (["--host", "[::1]"], "without brackets"),
        (["--capacity", "1e400"], "capacity"),
        (["--capacity", "lots"], "capacity"),
        (["--capacity", "10"], "capacity must be at least 1MiB, got 10 bytes (a bare number is bytes"),
        (["--idle-timeout", "nan"], "idle_timeout"),
        (["--auth-file", "/nonexistent/auth.json"], "/nonexistent/auth.json"),
    ],
)
def test_serve_refuses_a_bad_flag_in_one_line(flags, named):
    r = membrain("serve", *flags)
    assert r.returncode == 2 and named in the_error(r, "serve")
    assert len(r.stderr.strip().splitlines()) == 1  # nothing else: no log line, no usage


@pytest.mark.parametrize("variable, value, says", [
    ("MEMBRAIN_PORT", "abc", "MEMBRAIN_PORT='abc': expected an integer"),
    ("MEMBRAIN_IDLE_TIMEOUT", "soon", "MEMBRAIN_IDLE_TIMEOUT='soon': expected a number"),
])
def test_serve_names_a_bad_variable_and_what_it_expects(variable, value, says):
    r = membrain("serve", "--check-config", env={variable: value})
    assert r.returncode == 2 and the_error(r, "serve") == f"membrain serve: {says}"


def test_serve_refuses_a_capacity_beyond_the_hosts_memory():
    r = membrain("serve", "--port", "0", "--capacity", str(2 * host_memory()))
    assert r.returncode == 2 and "more than this host's memory" in the_error(r, "serve")


def test_serve_on_a_port_in_use_says_so_in_one_line(port_in_use):
    r = membrain("serve", "--port", str(port_in_use))
    assert r.returncode == 2 and "Address already in use" in the_error(r, "serve")
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_on_an_unresolvable_host_says_so_in_one_line():
    r = membrain("serve", "--port", "0", "--host", "no-such-host.invalid", "--allow-insecure-bind")
    assert r.returncode == 2 and "cannot listen on no-such-host.invalid" in the_error(r, "serve")


@pytest.mark.parametrize("endpoint", ["http://[::1", "http://localhost:99999", "redis://localhost:6379"])
def test_stats_refuses_a_bad_endpoint(endpoint):
    r = membrain("stats", "--endpoint", endpoint)
    assert r.returncode == 2 and "--endpoint" in the_error(r, "stats")


def test_stats_of_a_dead_server_is_exit_1_in_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = membrain("stats", "--endpoint", f"http://user:pw-secret@127.0.0.1:{port}")
    line = the_error(r, "stats")
    assert r.returncode == 1 and "cannot reach" in line and "pw-secret" not in line


def test_config_prints_no_secret():
    r = membrain("config", env={"VLLM_MEMBRAIN_ENDPOINT": "redis://alice:url-secret@host:6379",
                                "VLLM_MEMBRAIN_TOKEN": "token-secret", "VLLM_MEMBRAIN_REDIS_PASSWORD": "pw-secret"})
    assert r.returncode == 0 and "secret" not in r.stdout and "alice:***@host" in r.stdout
    r = membrain("config", env={"VLLM_MEMBRAIN_ENDPOINT": "redis://host:6379/0?password=query-secret&db=0"})
    assert r.returncode == 0 and "secret" not in r.stdout and "redis://host:6379/0?password=***&db=***" in r.stdout
    r = membrain("config", env={"VLLM_MEMBRAIN_ENDPOINT": "redis://alice:url-secret@host:99999"})
    assert r.returncode == 2 and "url-secret" not in the_error(r, "config")


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`membrain config --markdown | head -1`: the reader's end is closed before anything is written."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "membrain_async.cli", "config", "--markdown"], stdout=write,
                            stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == ""  # as a tool killed by SIGPIPE: no message, no traceback


def test_version():
    r = membrain("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"membrain {__version__}"


def test_bench_passes_its_options_on():
    r = membrain("bench", "--help")
    assert r.returncode == 0 and "--seconds" in r.stdout and "--systems" in r.stdout  # the bench's own help
    assert r.stdout.startswith("usage: membrain bench ")
    r = membrain("bench", "--no-such-option")
    assert r.returncode == 2 and "membrain bench: error: unrecognized arguments: --no-such-option" in r.stderr


# --- doctor --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--endpoint", "http://[::1"], "VLLM_MEMBRAIN_ENDPOINT"),
        (["--endpoint", "redis://u:pw-secret@host:99999"], "Port out of range"),
        (["--namespace", "a b"], "VLLM_MEMBRAIN_NAMESPACE"),
        (["--prompt", "@/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    ],
)
def test_doctor_refuses_a_bad_flag_in_one_line(flags, named):
    r = membrain("doctor", "--model", "unused", "--prompt", "hello", *flags)
    line = the_error(r, "doctor")
    assert r.returncode == 2 and named in line and "secret" not in line


def test_doctor_refuses_a_block_size_of_zero():
    r = membrain("doctor", "--model", "unused", "--prompt", "hello", "--block-size", "0")
    assert r.returncode == 2 and "--block-size: must be > 0" in r.stderr and "Traceback" not in r.stderr


def test_doctor_names_a_missing_model(tmp_path):
    pytest.importorskip("vllm")
    r = membrain("doctor", "--model", str(tmp_path / "no-model"), "--prompt", "hello")
    assert r.returncode == 2 and "--model" in the_error(r, "doctor")


def test_doctor_against_a_dead_server_calls_no_block_missing(model):
    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = membrain("doctor", "--model", model, "--prompt", " ".join(["word"] * 300), "--block-size", "16",
                 "--endpoint", f"http://127.0.0.1:{port}", timeout=300)
    assert r.returncode == 1 and "unreachable" in the_error(r, "doctor")
    blocks = [line for line in r.stdout.splitlines() if line.strip().startswith("block ")]
    assert blocks and all(" unknown " in line for line in blocks) and "missing" not in r.stdout
