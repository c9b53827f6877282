"""`adaptory report` through CliRunner: writes the page, --open, the default path, errors."""

from __future__ import annotations

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
    assert '<path class="loss-train"' in page and '<path class="edge merge"' in page
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
