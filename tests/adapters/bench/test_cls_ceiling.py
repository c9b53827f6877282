"""benchmarks/cls_ceiling.py, the check behind BENCHMARKS.md's claim that MiniLM, not Adaptory's
training, caps reviews from 40 rows: run for real (real MiniLM weights, a few steps) on a copy of
one domain's train.jsonl alone, so scoring any held-out file would fail."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import require_minilm

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_ceiling_methods_score_the_dev_split_without_eval_data(tmp_path):
    require_minilm()
    spec = importlib.util.spec_from_file_location(
        "cls_ceiling", ROOT / "benchmarks" / "cls_ceiling.py"
    )
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    (tmp_path / "news").mkdir()
    shutil.copy(ROOT / "examples" / "data" / "news" / "train.jsonl", tmp_path / "news")
    report = ceiling.run("news", 12, seeds=1, data=tmp_path, full_steps=4)

    train = [json.loads(line) for line in (tmp_path / "news" / "train.jsonl").open()]
    labels = sorted({row["label"] for row in train})
    assert report["labels"] == labels and report["rows"] == 12
    assert report["dev_rows"] == sum(round(sum(r["label"] == k for r in train) / 3) for k in labels)
    methods = report["methods"]
    assert set(methods) == {"centroid", "probe", "full", "contrastive"}
    assert [len(methods[m]) for m in ("centroid", "probe", "full", "contrastive")] == [1, 1, 1, 1]
    # Four topics, three rows each: frozen sentence embeddings are far above chance (0.25).
    assert methods["centroid"][0] >= 0.6 and methods["probe"][0] >= 0.6
    for scores in methods.values():  # each a share of the dev rows
        assert all(0 <= s <= 1 for s in scores)
        assert all(
            abs(s * report["dev_rows"] - round(s * report["dev_rows"])) < 1e-4 for s in scores
        )
    assert report["summary"]["full"] == {"mean": round(methods["full"][0], 3),
                                         "worst": round(methods["full"][0], 3), "runs": 1}  # fmt: skip
