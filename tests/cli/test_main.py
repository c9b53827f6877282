"""The CLI as a whole: every command's --help, the generated reference, error rendering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import COMMANDS, cli
from adaptory.cli.reference import _walk, render

ROOT = Path(__file__).resolve().parents[2]


def all_command_paths() -> list[list[str]]:
    return [path[1:] for path, _, _ in _walk(cli, ["adaptory"], None)]


def test_every_planned_command_is_installed():
    assert set(COMMANDS) <= {p[0] for p in all_command_paths() if p}


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "root")
def test_help_of_every_command(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def test_docs_cli_reference_is_in_sync():
    checked_in = (ROOT / "docs" / "CLI.md").read_text()
    assert checked_in == render(), (
        "docs/CLI.md is stale: python -m adaptory.cli.reference > docs/CLI.md"
    )


def test_domain_error_is_one_line_with_hint_and_exit_code(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "base", "init", "bad/name"])
    assert result.exit_code == 2
    assert "error: base name 'bad/name' is not allowed" in result.output
    assert "hint:" in result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adaptory.cli.main", "--debug", "base", "init", "bad/name"],
        capture_output=True,
        text=True,
        env={"ADAPTORY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_help_starts_without_importing_torch():
    code = (
        "import sys; from adaptory.cli.main import cli; "
        "from click.testing import CliRunner; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
