"""The README promises what the code does: its settings table is the one the code generates."""

import os

from membrain_async.config import settings_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_settings_table_matches_code():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert settings_table() in readme, "regenerate the table with `membrain config --markdown`"


def test_readme_has_exactly_the_two_setup_commands_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = "python3 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s tests"
    assert test_cmd in readme and test_cmd in ci
    assert "python3 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s demo" in readme
