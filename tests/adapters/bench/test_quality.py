"""`bench quality` on tiny bases (a few steps per run): every cell reports its seeds' scores,
mean, worst and base-only score on the right rows; --dev never reads eval.jsonl."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from adaptory.adapters.bench import BENCHES, BenchSettings
from adaptory.adapters.bench.quality import DEV_FRACTION, bench_quality
from adaptory.cli.bench_cmds import render
from adaptory.cli.main import App, cli

LABELS = ("neg", "pos")
FEW_STEPS = {"max_steps": 3, "lr": 0.05}  # enough to move a tiny head off the base


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _rendered(result: dict) -> str:
    """What `adaptory bench quality` prints for `result`."""
    out = io.StringIO()
    render(App(out=Console(file=out, width=240, markup=False)), result)
    return out.getvalue()


def _base_accuracy(base_dir: Path, rows: list[dict], seed: int) -> float:
    """Accuracy of the 4-bit base with `seed`'s newly initialised head, one row at a time."""
    import torch

    from adaptory.adapters.bases.loading import load_base
    from adaptory.adapters.bases.quantize import keep_4bit_trainable

    base = load_base(str(base_dir), task="seq-cls", labels=list(LABELS), seed=seed)
    keep_4bit_trainable(base.model)
    base.model.eval()
    hits = 0
    with torch.no_grad():
        for row in rows:
            enc = base.tokenizer(row["text"], truncation=True, max_length=128, return_tensors="pt")
            hits += LABELS[int(base.model(**enc).logits.argmax(-1))] == row["label"]
    return hits / len(rows)


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A classification domain (24 balanced train rows; 10 eval, 7 of them "pos", so that a
    head that always says one label scores 0.3 or 0.7) and a generation one (12 and 5 rows)."""
    root = tmp_path / "data"
    words = ["good", "bad", "fine", "poor", "great", "awful"]
    cls = [{"text": f"{words[i % 6]} item {i}", "label": LABELS[i % 2]} for i in range(24)]
    _write(root / "mini" / "train.jsonl", cls)
    held = [{"text": f"{words[i % 6]} thing {i}", "label": LABELS[i < 7]} for i in range(10)]
    _write(root / "mini" / "eval.jsonl", held)
    gen = [{"prompt": f"Shout: the cat {i}\nAnswer:", "completion": f" THE CAT {i}"}
           for i in range(17)]  # fmt: skip
    _write(root / "loud" / "train.jsonl", gen[:12])
    _write(root / "loud" / "eval.jsonl", gen[12:])
    return root


def test_quality_reports_mean_worst_and_base_per_domain_and_size(
    tmp_path, data_dir, tiny_bert_dir, tiny_llama_dir
):
    settings = BenchSettings(workdir=tmp_path / "bench")
    assert BENCHES["quality"] is bench_quality
    result = bench_quality(
        settings, seeds=2, classification=("mini",), generation=("loud",), cls_sizes=(8, 400),
        data_dir=data_dir, cls_base=str(tiny_bert_dir), gen_base=tiny_llama_dir,
        overrides=FEW_STEPS,
    )  # fmt: skip
    json.dumps(result)
    gen_eval = _rows(data_dir / "loud" / "eval.jsonl")
    assert result["bench"] == "quality" and result["settings"]["seeds"] == [0, 1]
    # 8 sampled rows, and all 24 when the size exceeds the file; generation trains on all 12
    assert set(result["results"]) == {"mini/8", "mini/24", "loud/12/lora", "loud/12/prefix"}
    for key, cell in result["results"].items():
        assert len(cell["scores"]) == len(cell["base_scores"]) == 2, key
        assert min(cell["scores"]) == cell["worst"] <= cell["mean"] <= cell["best"], key
        assert cell["mean"] == pytest.approx(sum(cell["scores"]) / 2), key
        assert cell["steps"] == 3, key
    for key in ("mini/8", "mini/24"):
        cell = result["results"][key]
        assert cell["rows_scored"] == 10 and cell["scored_on"] == "eval.jsonl"
        for score in cell["scores"] + cell["base_scores"]:  # accuracy over the 10 eval rows
            assert score * 10 == pytest.approx(round(score * 10))
    loud = result["results"]["loud/12/lora"]
    assert result["results"]["loud/12/prefix"]["method"] == "prefix"
    assert loud["rows_scored"] == 5 and loud["eval_loss"] > 0 and loud["base_eval_loss"] > 0
    assert [s["expected"] for s in loud["samples"]] == [r["completion"] for r in gen_eval[:2]]
    # the seeds differ, so the worst seed is not any seed
    assert any(len(set(c["scores"])) > 1 for c in result["results"].values())
    eval_rows = _rows(data_dir / "mini" / "eval.jsonl")
    for seed in (0, 1):  # base-only: the base and that seed's new head, with no adapter
        assert result["results"]["mini/8"]["base_scores"][seed] == pytest.approx(
            _base_accuracy(tiny_bert_dir, eval_rows, seed)
        )
    subset = _rows(tmp_path / "bench" / "quality-data" / "mini" / "train-8.jsonl")
    train = _rows(data_dir / "mini" / "train.jsonl")
    assert len(subset) == 8 and all(row in train for row in subset)
    assert Counter(r["label"] for r in subset) == {"neg": 4, "pos": 4}
    assert set(result["targets"]) == {
        "mini/8: worst seed accuracy >= base-only",
        "mini/24: worst seed accuracy >= base-only",
        "loud/12/lora: mean exact match >= 0.8",
        "loud/12/prefix: mean exact match >= 0.5",
    }
    bar = result["targets"]["loud/12/lora: mean exact match >= 0.8"]
    assert bar["value"] == loud["mean"] and bar["threshold"] == 0.8
    printed = _rendered(result)
    for key, cell in result["results"].items():
        domain, rows, *method = key.split("/")
        assert any(
            line.split()[1:8] == [domain, *(method or ["lora"]), rows, cell["metric"],
                                  f"{cell['mean']:.3f}",
                                  f"{cell['worst']:.3f}", f"{cell['base_only']:.3f}"]
            for line in printed.replace("│", " ").splitlines() if line.split()
        ), (key, printed)  # fmt: skip
    line = f"loud/12/lora: mean exact match >= 0.8: {loud['mean']:.3f}"
    assert printed.count(line) == 1, printed  # once, and a score, not a × ratio


def test_dev_mode_chooses_on_a_split_of_train_and_never_reads_eval(
    tmp_path, data_dir, tiny_bert_dir
):
    (data_dir / "mini" / "eval.jsonl").unlink()  # reading it now fails the run
    settings = BenchSettings(workdir=tmp_path / "bench")
    candidates = {"a": {"head_lr_factor": 1.0}, "b": {"head_lr_factor": 5.0}}
    with pytest.raises(Exception, match="eval.jsonl"):  # the tripwire works: not dev mode
        bench_quality(settings, seeds=1, classification=("mini",), generation=(),
                      cls_sizes=(8,), data_dir=data_dir, cls_base=str(tiny_bert_dir),
                      overrides=FEW_STEPS)  # fmt: skip
    result = bench_quality(
        settings, dev=True, seeds=1, classification=("mini",), cls_sizes=(8, 400),
        candidates=candidates, data_dir=data_dir, cls_base=str(tiny_bert_dir),
        overrides=FEW_STEPS,
    )  # fmt: skip
    split = tmp_path / "bench" / "quality-data" / "mini"
    pool, dev = _rows(split / "dev-train.jsonl"), _rows(split / "dev.jsonl")
    train = _rows(data_dir / "mini" / "train.jsonl")
    assert sorted(map(json.dumps, pool + dev)) == sorted(map(json.dumps, train))
    assert Counter(r["label"] for r in dev) == {lab: round(12 * DEV_FRACTION) for lab in LABELS}
    assert set(result["results"]) == {f"{c}|mini/{n}" for c in candidates for n in (8, len(pool))}
    for cell in result["results"].values():
        assert cell["scored_on"] == "dev.jsonl" and cell["rows_scored"] == len(dev)
    ranked = result["candidates"]
    assert [c["name"] for c in ranked] != [] and {c["name"] for c in ranked} == set(candidates)
    assert (ranked[0]["mean"], ranked[0]["worst"]) >= (ranked[1]["mean"], ranked[1]["worst"])
    assert result["chosen"] == ranked[0]["name"] and "targets" not in result
    assert f"chosen: {result['chosen']}" in _rendered(result)
    for c in ranked:
        mine = [r["mean"] for r in result["results"].values() if r["variant"] == c["name"]]
        assert c["mean"] == pytest.approx(sum(mine) / len(mine))


def test_dev_mode_refuses_generation_tasks(tmp_path, data_dir):
    from adaptory.registry.errors import ConfigError

    with pytest.raises(ConfigError, match="classification"):
        bench_quality(BenchSettings(workdir=tmp_path), dev=True, generation=("loud",),
                      data_dir=data_dir)  # fmt: skip


def test_quality_cli_names_an_unknown_domain(tmp_path, data_dir):
    out = CliRunner().invoke(
        cli,
        [
            "bench",
            "quality",
            "--data",
            str(data_dir),
            "--domain",
            "nope",
            "--workdir",
            str(tmp_path / "w"),
        ],  # fmt: skip
    )
    assert out.exit_code == 2, out.output
    assert "nope" in out.output and "train.jsonl" in out.output
    assert not (tmp_path / "w" / "quality-runs").exists()


def test_candidates_rank_by_dev_mean_then_by_worst_seed():
    from adaptory.adapters.bench.quality import _rank

    def cell(variant, mean, worst):
        return {"variant": variant, "mean": mean, "worst": worst}

    results = {  # x and y tie on the mean (0.7); y's worst seeds are better; z's mean is 0.6
        "x|a/40": cell("x", 0.8, 0.5), "x|b/40": cell("x", 0.6, 0.5),
        "y|a/40": cell("y", 0.7, 0.6), "y|b/40": cell("y", 0.7, 0.6),
        "z|a/40": cell("z", 0.9, 0.9), "z|b/40": cell("z", 0.3, 0.3),
    }  # fmt: skip
    ranked = _rank(results, {"x": {}, "z": {}, "y": {"head_lr_factor": 3.0}})
    assert [c["name"] for c in ranked] == ["y", "x", "z"]
    assert [c["mean"] for c in ranked] == pytest.approx([0.7, 0.7, 0.6])
    assert ranked[0]["settings"] == {"head_lr_factor": 3.0} and ranked[0]["cells"] == 2
