"""`adaptory report` and `show --plot` through CliRunner: the page, --open, paths, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.testing import make_lora_folder


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    reg = Registry(home)
    reg.add(
        make_lora_folder(tmp_path / "a"),
        name="support-bot",
        loss_history=[{"step": s, "loss": 3.0 / s} for s in range(1, 21)],
        metrics={"eval_loss": 1.5, "base": {"eval_loss": 2.9}},
        description="<script>alert(1)</script>",
    )
    first = reg.resolve("support-bot:1")
    reg.add(
        make_lora_folder(tmp_path / "b", seed=1),
        name="merged",
        parents=[{"ref": first.ref, "digest": first.digest, "weight": 1.0}],
    )
    return home


def test_report_writes_the_page(home, tmp_path):
    out = tmp_path / "site" / "report.html"
    result = CliRunner().invoke(cli, ["--home", str(home), "report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (2 adapters)" in result.output
    page = out.read_text()
    assert 'data-ref="support-bot:1"' in page and 'data-ref="merged:1"' in page
    first = Registry(home).resolve("support-bot:1")
    assert f'<g id="chart{first.id}-loss-train">' in page and '<path class="edge merge"' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page


def test_report_defaults_to_a_file_in_the_current_folder(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--home", str(home), "report"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adaptory-report.html").is_file()


def test_report_open_hands_the_file_to_the_browser(home, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--home", str(home), "report", "-o", str(out), "--open"])
    assert result.exit_code == 0, result.output
    assert opened == [out.resolve().as_uri()]


def test_report_of_an_empty_registry(tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "empty"), "report", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(0 adapters)" in result.output
    assert "The registry is empty" in out.read_text()


def test_report_to_an_unwritable_path_is_one_clear_error(home, tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "report.html"
    result = CliRunner().invoke(cli, ["--home", str(home), "report", "--out", str(out)])
    assert result.exit_code == 2
    assert "error: cannot write" in result.output
    assert "Traceback" not in result.output


def test_show_plot_writes_a_png_and_refuses_entries_without_history(home, tmp_path):
    png = tmp_path / "loss.png"
    result = CliRunner().invoke(
        cli, ["--home", str(home), "show", "support-bot", "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = CliRunner().invoke(cli, ["--home", str(home), "show", "merged", "--plot", str(png)])
    assert result.exit_code == 2
    assert "no loss history" in result.output


def test_show_plot_svg_is_the_report_drawing(home, tmp_path):
    svg = tmp_path / "loss.svg"
    result = CliRunner().invoke(
        cli, ["--home", str(home), "show", "support-bot", "--plot", str(svg)]
    )
    assert result.exit_code == 0, result.output
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and '<g id="loss-train">' in text
    assert '<g id="loss-base">' in text  # metrics["base"]["eval_loss"] is known


def test_list_imports_neither_jinja_nor_matplotlib(home):
    """`adaptory list` shares a helper with the report; the report's libraries stay unloaded."""
    code = (
        "import sys; from click.testing import CliRunner; from adaptory.cli.main import cli; "
        f"r = CliRunner().invoke(cli, ['--home', {str(home)!r}, 'list']); "
        "assert r.exit_code == 0 and 'support-bot' in r.output, r.output; "
        "print(sorted(m for m in ('jinja2', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
