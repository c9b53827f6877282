"""The benchmarks run (quick mode, tiny base) and report well-formed figures; speed is not
asserted. The batched decode path gives PEFT's mixed-batch greedy tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from adaptory.adapters import bench
from adaptory.adapters.bench import BenchSettings
from adaptory.adapters.serving.lora_bank import LoraBank
from adaptory.cli.main import cli


@pytest.fixture
def settings(tmp_path, tiny_llama_dir) -> BenchSettings:
    return BenchSettings(workdir=tmp_path / "bench", base_dir=tiny_llama_dir, quick=True, repeats=1)


def _positive_numbers(value) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _positive_numbers(item)
    elif isinstance(value, list):
        for item in value:
            _positive_numbers(item)
    elif isinstance(value, float):
        assert math.isfinite(value) and value > 0


def _well_formed(result: dict, name: str) -> None:
    assert result["bench"] == name
    assert result["results"] and result["settings"]["quick"] is True
    json.dumps(result)  # JSON-able as it is
    timings = [r for r in result["results"].values() if isinstance(r, dict) and "median_s" in r]
    for r in timings:
        assert r["median_s"] > 0 and r["runs"] >= 1
    _positive_numbers({k: v for k, v in result.items() if k in ("results", "ratios")})
    assert all(isinstance(v, bool) for v in result.get("targets", {}).values())


def test_bank_decode_matches_peft_adapter_names(tmp_path, tiny_llama_dir):
    settings = BenchSettings(workdir=tmp_path, base_dir=tiny_llama_dir)
    loaded = bench.load_bench_base(tiny_llama_dir, settings)
    shapes = bench.lora_shapes(loaded.model)
    folders = bench.make_adapters(tiny_llama_dir, shapes, 3, tmp_path / "adapters")
    rows = ["a0", None, "a1", "a2", "a0", None]
    ids, mask = bench.prompts(loaded.tokenizer, len(rows), 10, "cpu", seed=1)

    peft_model = bench.peft_with_adapters(
        bench.load_bench_base(tiny_llama_dir, settings).model, folders
    )
    expected = bench.greedy_decode(
        peft_model, ids, mask, 8, adapter_names=[r or "__base__" for r in rows]
    )
    bank = LoraBank(loaded.model)
    for folder in folders:
        bank.add(folder.name, *bench.read_adapter(folder))
    with bank.rows(rows):
        got = bench.greedy_decode(loaded.model, ids, mask, 8)
    with bank.rows(["a1"] * len(rows)):  # one adapter for all rows: the no-gather path
        single = bench.greedy_decode(loaded.model, ids, mask, 8)
    peft_model.set_adapter("a1")
    assert torch.equal(single, bench.greedy_decode(peft_model, ids, mask, 8))
    plain = bench.greedy_decode(loaded.model, ids, mask, 8)
    assert got.shape == (len(rows), 8)
    assert torch.equal(got, expected)
    assert torch.equal(plain[[1, 5]], got[[1, 5]])  # base rows stay the base
    assert not torch.equal(plain[[0, 2, 3, 4]], got[[0, 2, 3, 4]])  # the adapters matter


def test_bench_swap(settings):
    result = bench.run_bench("swap", settings)
    _well_formed(result, "swap")
    assert {"warm_bank_rows", "cold_registry_to_bank", "merged_model_reload"} <= set(
        result["results"]
    )
    assert result["machine"]["torch"] == torch.__version__


def test_bench_memory(settings):
    result = bench.bench_memory(settings, counts=[1, 3])
    _well_formed(result, "memory")
    rows = result["results"]["bank"]
    assert [r["adapters"] for r in rows] == [1, 3]
    assert rows[1]["bank_nbytes"] > rows[0]["bank_nbytes"] > 0
    # the bank stores exactly r·(d_in+d_out) per adapted matrix (plus the zero slot)
    assert result["results"]["bank_marginal_over_theory"] == pytest.approx(1.0)


def test_bench_train(settings):
    result = bench.bench_train(settings)
    _well_formed(result, "train")
    assert {"plain_peft/nf4", "plain_peft/none"} <= set(result["results"])
    if "adaptory_train/nf4" in result["results"]:
        assert result["results"]["adaptory_train/nf4"]["tokens"] > 0


def test_bench_serve_cli_writes_json_and_plot(tmp_path, tiny_llama_dir):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    args = ["bench", "serve", "--quick", "--repeats", "1", "--base", str(tiny_llama_dir)]
    args += ["--device", "cpu", "--json", str(out), "--plot", str(png), "-k", "2", "-k", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    _well_formed(data, "serve")
    names = set(data["results"])
    assert {"base", "bank/K=1", "bank/K=4", "peft_mixed/K=4", "peft_groups/K=2"} <= names
    assert all(r["tokens_per_s"] > 0 for r in data["results"].values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "ratios" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not bench.serve_available(), reason="adaptory serve is not in this build")
def test_bench_http(settings):
    result = bench.bench_http(settings, k=2)
    _well_formed(result, "http")
    r = result["results"]
    assert r["completion_tokens"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0


@pytest.mark.parametrize("command", ["swap", "serve", "http", "memory", "train"])
def test_bench_help(command):
    result = CliRunner().invoke(cli, ["bench", command, "--help"])
    assert result.exit_code == 0 and "--json" in result.output
