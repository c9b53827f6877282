"""The HTML report and the loss plot: content, escaping, charts, lineage, and a real browser.

The browser tests render the page in headless Chromium (Debian's `chromium`) and skip, saying
why, only when no Chromium is installed; CI installs it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from adaptory.cli.report.lineage import MAX_LONE_NODES, find_parent, lineage_graph
from adaptory.cli.report.page import lineage_section, render_report, short_fingerprint, write_report
from adaptory.cli.report.plots import (
    MAX_CURVE_POINTS,
    LossSeries,
    loss_chart_svg,
    loss_series,
    plot_loss,
)
from adaptory.registry import Registry
from adaptory.registry.errors import BadInput, ConfigError
from adaptory.registry.testing import make_lora_folder

FINGERPRINT = {"digest": "9f2c4e1ab37d" + "0" * 52, "weights": "ab" * 32, "quant": "nf4+dq"}
XSS = '<script>alert("pwned")</script>'
CONFUSION = {"labels": ["neg", "pos"], "matrix": [[40, 10], [5, 45]]}
SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"
REPO = Path(__file__).resolve().parents[3]


def history(steps: int, start: float, end: float, evals: int = 4) -> list[dict]:
    points = []
    for step in range(1, steps + 1):
        loss = end + (start - end) * math.exp(-4 * step / steps)
        points.append({"step": step, "loss": loss, "lr": 1e-4})
        if step % (steps // evals) == 0:
            points.append({"step": step, "eval_loss": loss + 0.05})
    return points


def populate(home: Path, src: Path) -> Registry:
    """Two versions of a generator, a classifier, a merge of two entries and an import."""
    reg = Registry(home)

    def add(seed: int, **fields):
        folder = make_lora_folder(src / f"a{seed}", seed=seed)
        return reg.add(folder, base_fingerprint=FINGERPRINT, **fields)

    gen_metrics = {"eval_loss": 1.7, "perplexity": 5.5, "base": {"eval_loss": 2.9}}
    bot1 = add(1, name="support-bot", loss_history=history(40, 3.0, 1.6), metrics=gen_metrics)
    add(2, name="support-bot", loss_history=history(60, 3.0, 1.4), tags=["prod"],
        metrics={**gen_metrics, "eval_loss": 1.5}, description=f"v2 {XSS} & more")  # fmt: skip
    add(3, name="sentiment", task="seq-cls", loss_history=history(30, 0.9, 0.3),
        metrics={"accuracy": 0.85, "macro_f1": 0.84, "confusion_matrix": CONFUSION,
                 "base": {"accuracy": 0.5, "confusion_matrix": CONFUSION}})  # fmt: skip
    legal = add(4, name="legal", method="prefix", loss_history=history(20, 3.5, 2.0))
    add(5, name="bot-legal", metrics={"eval_loss": 1.6}, parents=[
        {"ref": bot1.ref, "name": bot1.name, "version": 1, "digest": bot1.digest, "weight": 0.7},
        {"ref": legal.ref, "name": legal.name, "version": 1, "digest": legal.digest, "weight": 0.3},
    ])  # fmt: skip
    add(6, name="community", parents=[{"imported_from": "/downloads/community-lora"}])
    return reg


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    """Built once per module: the tests only read it."""
    folder = tmp_path_factory.mktemp("report-registry")
    return populate(folder / "home", folder / "src")


# content ---------------------------------------------------------------------------------------


def test_report_has_a_row_a_card_and_a_curve_per_adapter(reg):
    entries = reg.list()
    page = render_report(entries, home=reg.home)
    assert page.startswith("<!DOCTYPE html>")
    for entry in entries:
        assert f'<tr class="adapter-row" data-ref="{entry.ref}">' in page
        assert f'id="entry-{entry.id}"' in page
    with_history = [e for e in entries if e.loss_history]
    assert len(with_history) == 4
    for entry in with_history:  # each chart's series are groups named by the drawing's gids
        assert f'<g id="chart{entry.id}-loss-train">' in page
        assert f'<g id="chart{entry.id}-loss-eval">' in page
    assert page.count('-loss-train">') == page.count('-loss-eval">') == 4
    assert page.count('-loss-base">') == 2  # the generator's base eval loss line
    assert page.count('<table class="confusion">') == 2  # the classifier and its base
    assert "9f2c4e1ab37d · nf4+dq" in page
    assert FINGERPRINT["digest"] not in re.sub(r'title="[^"]*"', "", page)  # full one: tooltip
    assert "0.85" in page and "0.5" in page and "+0.35" in page  # accuracy vs base, better
    assert 'class="good">-1.4' in page  # eval loss 1.5 vs 2.9: lower is better
    assert "No loss history" in page  # the merge and the import have none


def test_user_text_is_escaped(tmp_path):
    reg = Registry(tmp_path / "home")
    hostile = '"><img src=x onerror=alert(1)>'
    reg.add(
        make_lora_folder(tmp_path / "a"),
        name="evil",
        base_model=hostile,
        description=XSS,
        metrics={
            "accuracy": 0.5,
            "confusion_matrix": {"labels": [XSS, "b"], "matrix": [[1, 0], [0, 1]]},
        },
        parents=[{"imported_from": f"/tmp/{XSS}"}, {"ref": hostile, "weight": 1}],
        training_config={"note": XSS},
    )
    page = render_report(reg.list())
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    page = page.replace("&#34;", "&quot;")  # Jinja's escaper spells a quote by its number
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


def test_report_loads_nothing_from_anywhere(reg):
    page = render_report(reg.list())
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    # The SVG and XLink namespace names (matplotlib's charts declare both), never fetched.
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    for needle in ("<script", "<link", "<iframe", " src=", "@import", "url(http"):
        assert needle not in page
    assert "default-src 'none'" in page


def test_lineage_graph_edges_and_generations(reg):
    nodes, edges = lineage_graph(reg.list())
    by_label = {node.label: node for node in nodes.values()}
    links = {(nodes[e.parent].label, nodes[e.child].label, e.weight, e.kind) for e in edges}
    assert links == {
        ("support-bot:1", "bot-legal:1", 0.7, "merge"),
        ("legal:1", "bot-legal:1", 0.3, "merge"),
        ("community-lora", "community:1", None, "source"),
    }
    assert by_label["community-lora"].entry is None
    assert by_label["community-lora"].generation == 0
    assert by_label["support-bot:1"].generation == 1
    assert by_label["bot-legal:1"].generation == 2
    assert by_label["sentiment:1"].generation == 1


def test_lineage_svg_has_a_path_per_edge_and_a_node_per_entry(reg):
    page = render_report(reg.list())
    svg = page[page.index('<svg class="lineage"') :]
    svg = svg[: svg.index("</svg>")]
    assert svg.count('<path class="edge') == 3
    assert svg.count('<g class="node') == len(reg.list()) + 1  # plus the import's source
    assert "×0.7" in svg and "×0.3" in svg


def test_many_unconnected_entries_are_left_out_of_the_graph(reg):
    template = reg.resolve("sentiment")
    solos = [replace(template, id=1000 + i, name=f"solo{i}") for i in range(MAX_LONE_NODES + 1)]
    section = lineage_section([*reg.list(), *solos])
    assert "solo0:1" not in section and "sentiment:1" not in section  # and support-bot:2
    assert f"{MAX_LONE_NODES + 3} adapters without parents or children are left out" in section
    assert section.count('<path class="edge') == 3
    assert "support-bot:1" in section


def test_find_parent_by_ref_digest_name_version_and_tag(reg):
    entries = reg.list()
    v2 = reg.resolve("support-bot:2")
    assert find_parent({"ref": "support-bot:2"}, entries) == v2
    assert find_parent({"ref": "gone:9", "digest": v2.digest}, entries) == v2
    assert find_parent({"name": "support-bot", "version": 2}, entries) == v2
    assert find_parent({"ref": "support-bot:prod"}, entries) == v2
    assert find_parent({"ref": "support-bot"}, entries) == v2
    assert find_parent({"ref": "support-bot:nope"}, entries) is None
    assert find_parent({"imported_from": "/x"}, entries) is None


def test_a_parent_cycle_still_renders(tmp_path):
    reg = Registry(tmp_path / "home")
    reg.add(make_lora_folder(tmp_path / "a"), name="a", parents=[{"ref": "b:1"}])
    reg.add(make_lora_folder(tmp_path / "b", seed=1), name="b", parents=[{"ref": "a:1"}])
    page = render_report(reg.list())
    assert page.count('<path class="edge') == 2


def test_empty_registry(tmp_path):
    page = render_report(Registry(tmp_path / "home").list())
    assert "The registry is empty" in page and "0 adapters" in page


def test_odd_metadata_renders_without_errors(tmp_path):
    reg = Registry(tmp_path / "home")
    reg.add(
        make_lora_folder(tmp_path / "a"),
        name="odd",
        loss_history=[2.0, "x", None, float("nan"), 1.5, {"loss": True}, {"eval_loss": 1.7}],
        metrics={
            "accuracy": "high",
            "loss": 1.0,
            "base": "n/a",
            "evals": [{"split": "test", "loss": 1.1}],
            "confusion_matrix": {"labels": ["a"], "matrix": [[1, 2], [3]]},
        },
        parents=[{"weight": 0.5}, {"ref": "odd:1"}],
        base_fingerprint={"weights": "f" * 64},
    )
    reg.add(make_lora_folder(tmp_path / "b"), name="flat", loss_history=[3.0])
    page = render_report(reg.list())
    assert page.count('-loss-train">') == 2
    assert "other metrics" in page  # the evals list, shown as escaped JSON
    assert '<table class="confusion">' not in page
    assert "ffffffffffff" in page


def test_loss_series_reads_numbers_and_records():
    entry = SimpleNamespace(
        loss_history=[3.0, {"step": 10, "loss": 2.0, "eval_loss": 2.2}, {"eval_loss": 2.1}],
        metrics={"base": {"eval_loss": 2.9}},
    )
    series = loss_series(entry)
    assert series.train == [(0.0, 3.0), (10.0, 2.0)]
    assert series.eval == [(10.0, 2.2), (2.0, 2.1)]
    assert series.base_eval_loss == 2.9


def test_short_fingerprint():
    assert short_fingerprint(FINGERPRINT) == "9f2c4e1ab37d · nf4+dq"
    assert short_fingerprint(None) == ""


def test_write_report_replaces_the_file_atomically(reg, tmp_path):
    out = tmp_path / "nested" / "report.html"
    out.parent.mkdir()
    out.write_text("old")
    assert write_report(reg.list(), out) == out
    assert "support-bot" in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BadInput, match="cannot write"):
        write_report(reg.list(), tmp_path / "a-file" / "x.html")


def test_the_page_is_deterministic_and_its_ids_unique(reg):
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    first = render_report(reg.list(), home=reg.home, generated_at=when)
    assert render_report(reg.list(), home=reg.home, generated_at=when) == first
    assert "dc:date" not in first and "<metadata" not in first  # matplotlib's date stays out
    ids = re.findall(r'\bid="([^"]+)"', first)
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert len(ids) > 100 and not duplicates  # four charts, each numbering its groups from 1
    for target in re.findall(r'(?:url\(#|href="#)([^")]+)', first):
        assert target in ids  # every clip path, marker and card link points at something


def test_templates_ship_as_package_data():
    """The templates folder is a listed package and every file in it matches its package-data
    patterns, so a wheel carries them all."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "adaptory.cli.report.templates" in config["packages"]
    patterns = config["package-data"]["adaptory.cli.report.templates"]
    templates = [p.name for p in (REPO / "cli" / "report" / "templates").iterdir()]
    assert len(templates) >= 5
    assert [t for t in templates if not any(fnmatch(t, pattern) for pattern in patterns)] == []


# the loss chart --------------------------------------------------------------------------------


def chart_points(svg: str, group_id: str) -> tuple[list[tuple[float, float]], list]:
    """The vertices of the path in the chart's group `group_id`, and its markers' positions."""
    group = ET.fromstring(svg).find(f".//{SVG}g[@id='{group_id}']")
    assert group is not None, f"no group {group_id}"
    path = group.find(f"{SVG}path")
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.get("d"))]
    vertices = list(zip(numbers[::2], numbers[1::2], strict=True))
    markers = [(float(u.get("x")), float(u.get("y"))) for u in group.iter(f"{SVG}use")]
    return vertices, markers


def axis_map(data: list[float], pixels: list[float]) -> tuple[float, float]:
    """Scale and offset of the straight line through (data, pixels), checked to fit every one."""
    scale, offset = np.polyfit(data, pixels, 1)
    assert np.allclose(np.polyval([scale, offset], data), pixels, atol=0.01)
    return scale, offset


def test_chart_draws_every_point_where_the_data_puts_it():
    """The training curve's vertices fix the data → pixel maps (one straight line per axis,
    losses upwards); the eval markers and the base line must sit on the same maps."""
    train = [(float(step), 3.0 * math.exp(-step / 20) + 1.0) for step in range(1, 81)]
    evals = [(20.0, 2.3), (40.0, 1.6), (80.0, 1.2)]
    svg = loss_chart_svg(LossSeries(train, evals, base_eval_loss=2.9), "t-")
    vertices, _ = chart_points(svg, "t-loss-train")
    assert len(vertices) == len(train)
    x_scale, x_offset = axis_map([s for s, _ in train], [x for x, _ in vertices])
    y_scale, y_offset = axis_map([v for _, v in train], [y for _, y in vertices])
    assert x_scale > 0 and y_scale < 0  # steps run right, a lower loss is drawn lower
    _, markers = chart_points(svg, "t-loss-eval")
    expected = [(x_scale * s + x_offset, y_scale * v + y_offset) for s, v in evals]
    assert np.allclose(markers, expected, atol=0.01)
    base, _ = chart_points(svg, "t-loss-base")
    assert np.allclose([y for _, y in base], y_scale * 2.9 + y_offset, atol=0.01)
    assert "step" in svg and "loss" in svg  # the axis labels, as text


def test_a_long_history_is_thinned_but_keeps_its_last_point():
    # A saw that a thinned curve still draws as a saw: no vertex is redundant. Step 3001, the
    # last, is off the thinning stride; two eval points mark where steps 0 and 3001 are drawn.
    train = [(float(step), 5.0 if step % 4 < 2 else 4.0) for step in range(3002)]
    svg = loss_chart_svg(LossSeries(train, [(0.0, 4.5), (3001.0, 4.5)]), "t-")
    vertices, _ = chart_points(svg, "t-loss-train")
    assert MAX_CURVE_POINTS / 2 < len(vertices) <= MAX_CURVE_POINTS + 1
    xs = [x for x, _ in vertices]
    assert xs == sorted(xs)
    _, ruler = chart_points(svg, "t-loss-eval")
    assert math.isclose(xs[0], ruler[0][0], abs_tol=0.01)
    assert math.isclose(xs[-1], ruler[1][0], abs_tol=0.01)


def test_two_charts_on_one_page_share_no_id():
    series = LossSeries([(0.0, 2.0), (1.0, 1.0)], [(1.0, 1.5)])
    a, b = loss_chart_svg(series, "a-"), loss_chart_svg(series, "b-")
    ids_a = set(re.findall(r'\bid="([^"]+)"', a))
    ids_b = set(re.findall(r'\bid="([^"]+)"', b))
    assert ids_a and all(i.startswith("a-") for i in ids_a)
    assert not ids_a & ids_b
    assert re.sub(r'(id="|#)a-', r"\1b-", a) == b  # the same drawing, only renamed


# plot_loss -------------------------------------------------------------------------------------


def test_plot_loss_writes_a_png(reg, tmp_path):
    path = plot_loss(reg.resolve("support-bot:2"), tmp_path / "plots" / "loss.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_loss_svg_by_suffix_is_the_report_drawing_and_reproducible(reg, tmp_path):
    entry = reg.resolve("sentiment")
    path = plot_loss(entry, tmp_path / "loss.svg")
    text = path.read_text()
    assert text.lstrip().startswith("<?xml")
    vertices, _ = chart_points(text, "loss-train")
    assert len(vertices) == len(loss_series(entry).train)
    _, markers = chart_points(text, "loss-eval")
    assert len(markers) == len(loss_series(entry).eval)
    again = plot_loss(entry, tmp_path / "again.svg")
    assert again.read_bytes() == path.read_bytes()  # no date, no random ids


def test_plot_loss_refuses_an_entry_without_history(reg, tmp_path):
    with pytest.raises(ConfigError, match="bot-legal:1 has no loss history") as info:
        plot_loss(reg.resolve("bot-legal"), tmp_path / "loss.png")
    assert "merged and imported" in info.value.hint
    assert not (tmp_path / "loss.png").exists()


# in a real browser -----------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("ADAPTORY_CHROMIUM")
    if explicit:
        return explicit
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def chromium():
    """The browser; a skip on a developer's machine without one, a failure in CI (`CI` set),
    where a browser test that cannot run must not pass as green."""
    binary = find_chromium()
    if binary is None:
        message = (
            "no Chromium found (tried chromium, chromium-browser, google-chrome; or set "
            "ADAPTORY_CHROMIUM): apt-get install -y chromium"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {message}")
        pytest.skip(message)
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture
def report_file(reg, tmp_path) -> Path:
    return write_report(reg.list(), tmp_path / "report.html", home=reg.home)


def test_chromium_renders_every_row_and_the_svg_paths(chromium, reg, report_file, tmp_path):
    proc = run_chromium(chromium, tmp_path / "profile", "--dump-dom", report_file.as_uri())
    dom = proc.stdout
    assert "<table" in dom
    for entry in reg.list():
        assert re.search(rf'<tr class="adapter-row" data-ref="{re.escape(entry.ref)}">', dom)
    curves = re.findall(r'<g id="chart\d+-loss-train">\s*<path d="M[\d. MLz\s-]+"', dom)
    assert len(curves) == 4
    assert len(re.findall(r'<path class="edge (merge|source)" d="M[^"]+"', dom)) == 3
    assert len(re.findall(r"<svg ", dom)) == 5  # four loss charts and the lineage graph
    assert "<script" not in dom  # the description's script stayed text
    assert "&lt;script&gt;" in dom


def test_chromium_screenshot_is_not_blank(chromium, report_file, tmp_path):
    shot = tmp_path / "shot.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}",
                 "--window-size=1280,2000", report_file.as_uri())  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        from PIL import Image
    except ImportError:  # pillow comes with matplotlib; without it, a blank page compresses small
        assert len(data) > 50_000
        return
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50
    background = max(colours)[0]
    assert background / (1280 * 2000) < 0.95  # most of it is not the page background
