"""The benchmarks run (quick mode, tiny bases) and report well-formed figures and targets; speed
is not asserted. The batched decode path gives PEFT's mixed-batch greedy tokens, and
transformers' compiled generate gives the reference decode loop's tokens."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from adaptory.adapters import bench
from adaptory.adapters.bench import BenchSettings
from adaptory.adapters.bench.harness import interleave
from adaptory.adapters.serving.lora_bank import LoraBank
from adaptory.cli.main import cli

DEVICE = os.environ.get("ADAPTORY_TEST_DEVICE", "cpu")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture
def settings(tmp_path, tiny_llama_dir) -> BenchSettings:
    return BenchSettings(
        workdir=tmp_path / "bench", base_dir=tiny_llama_dir, quick=True, repeats=1, device=DEVICE
    )


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
    _positive_numbers({k: v for k, v in result.items() if k == "ratios"})
    for name, outcome in result.get("targets", {}).items():
        assert outcome["op"] in (">=", "<=") and outcome["threshold"] > 0, name
        if outcome["value"] is None:
            assert outcome["met"] is None and outcome["note"], name
        else:
            passes = (outcome["value"] >= outcome["threshold"]) == (outcome["op"] == ">=")
            assert outcome["met"] is (passes or outcome["value"] == outcome["threshold"]), name


def test_targets_say_met_or_missed_by_how_much():
    met = bench.target(0.99, ">=", 0.9)
    assert met["met"] is True and met["margin"] == pytest.approx(0.1)
    missed = bench.target(1.1025, "<=", 1.05)  # 10.25 % slower against at most 5 %
    assert missed["met"] is False and missed["margin"] == pytest.approx(-0.05)
    absent = bench.target(None, ">=", 3.0, missing="K=32 not measured")
    assert absent["met"] is None and absent["note"] == "K=32 not measured"


def test_interleave_drops_a_failing_optional_variant_and_keeps_the_rest():
    def broken() -> float:
        raise RuntimeError("no compiler")

    errors: dict[str, str] = {}
    lines: list[str] = []
    times = interleave(
        {"a": lambda: 1.0, "compiled": broken, "b": lambda: 2.0},
        3,
        optional=["compiled"],
        errors=errors,
        log=lines.append,
    )
    assert times == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert "no compiler" in errors["compiled"]
    assert any("compiled: failed" in line for line in lines)
    one = interleave({"a": lambda: 1.0, "compiled": broken}, 1, optional=["compiled"])
    assert one == {"a": [1.0]}
    with pytest.raises(RuntimeError, match="no compiler"):
        interleave({"a": lambda: 1.0, "b": broken}, 1)


def test_bank_decode_matches_peft_adapter_names(tmp_path, tiny_llama_dir):
    settings = BenchSettings(workdir=tmp_path, base_dir=tiny_llama_dir, device=DEVICE)
    loaded = bench.load_bench_base(tiny_llama_dir, settings, dtype="float32")  # exact on any device
    shapes = bench.lora_shapes(loaded.model)
    folders = bench.make_adapters(tiny_llama_dir, shapes, 3, tmp_path / "adapters")
    rows = ["a0", None, "a1", "a2", "a0", None]
    ids, mask = bench.prompts(loaded.tokenizer, len(rows), 10, DEVICE, seed=1)

    peft_model = bench.peft_with_adapters(
        bench.load_bench_base(tiny_llama_dir, settings, dtype="float32").model, folders
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


def test_transformers_generate_paths_give_the_reference_greedy_tokens(tmp_path, tiny_llama_dir):
    """transformers' default generate, its static cache, and its compiled decode step (forced on
    for a bitsandbytes model, traced here with dynamo's eager backend) all give the tokens of
    the benchmarks' own decode loop: the serve benchmark compares like with like."""
    from transformers import CompileConfig

    settings = BenchSettings(workdir=tmp_path, base_dir=tiny_llama_dir, device=DEVICE)
    loaded = bench.load_bench_base(tiny_llama_dir, settings, dtype="float32")  # exact on any device
    model = loaded.model
    ids, mask = bench.prompts(loaded.tokenizer, 3, 9, DEVICE, seed=2)
    reference = bench.greedy_decode(model, ids, mask, 5)
    assert getattr(model, "hf_quantizer", None) is not None  # loaded by transformers, 4-bit
    assert torch.equal(bench.hf_generate(model, ids, mask, 5), reference)
    assert torch.equal(bench.hf_generate(model, ids, mask, 5, static=True), reference)
    assert not bench.workload.hf_compiled(model)
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True
    compiled = bench.hf_generate(model, ids, mask, 5, static=True, compile=True,
                                 compile_config=config)  # fmt: skip
    assert bench.workload.hf_compiled(model)  # transformers took its compiled path
    assert torch.equal(compiled, reference)
    assert model.hf_quantizer is not None  # put back


def test_bench_swap(settings):
    result = bench.run_bench("swap", settings)
    _well_formed(result, "swap")
    assert {"warm_bank_rows", "cold_registry_to_bank", "merged_model_reload"} <= set(
        result["results"]
    )
    assert result["machine"]["torch"] == torch.__version__


def _raw_adapter_bytes(config, r: int, element_size: int) -> int:
    """r·(d_in + d_out) per adapted matrix, from the model config's published shapes."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = config.num_key_value_heads * hidden // heads
    per_layer = (hidden + hidden) + (hidden + kv) + (hidden + kv) + (hidden + hidden)
    return r * per_layer * config.num_hidden_layers * element_size


def test_bench_memory(settings):
    result = bench.bench_memory(settings, counts=[1, 4])
    _well_formed(result, "memory")
    r = result["results"]
    rows = r["bank"]
    assert [row["adapters"] for row in rows] == [1, 4]
    model = bench.load_bench_base(settings.base_dir, settings).model
    # the bank holds adapters in the base's 4-bit compute dtype (fp32 on a CPU, bf16 on a GPU)
    element = model.model.layers[0].self_attn.q_proj.compute_dtype.itemsize
    raw = _raw_adapter_bytes(model.config, settings.rank, element)
    assert r["adapter_raw_bytes"] == raw
    # room for exactly N adapters plus the zero slot, nothing else (no doubling to 8 slots)
    assert [row["bank_nbytes"] for row in rows] == [2 * raw, 5 * raw]
    assert r["bank_marginal_over_theory"] == pytest.approx(1.0)
    runtime = r["runtime"]
    assert runtime["resident"] == 4 and runtime["bank_nbytes"] == 5 * raw
    assert set(runtime["throughput"]) == {"runtime/K=1/B=4", "runtime/K=4/B=4"}
    assert result["targets"]["bank: marginal bytes per adapter <= 1.2x raw"]["met"] is True
    memory = result["targets"]["4 resident adapters (runtime): memory <= 1.2x raw adapter bytes"]
    assert memory["value"] >= 5 / 4 and memory["met"] is False  # slot 0 is a quarter of 4
    assert result["targets"]["K=4 mixed >= 0.85x K=1 (runtime, batch 4)"]["value"] > 0


def test_bench_train(settings):
    result = bench.bench_train(settings)
    _well_formed(result, "train")
    names = {"plain_peft/nf4", "plain_peft/none", "adaptory_train/nf4", "adaptory_train/none"}
    assert set(result["results"]) == names
    # every run times the same steps 2..N of the same batches
    assert len({r["tokens"] for r in result["results"].values()}) == 1
    for quant in ("nf4", "none"):
        outcome = result["targets"][f"adaptory train <= 5% slower than a plain loop ({quant})"]
        assert outcome["value"] == pytest.approx(
            result["results"][f"adaptory_train/{quant}"]["median_s"]
            / result["results"][f"plain_peft/{quant}"]["median_s"]
        )


SERVE_TARGETS = (
    "runtime K=8 >= 0.9x runtime K=1 (batch 8)",
    "runtime K=8 >= 0.8x HF fastest, no adapter (batch 8)",
    "runtime K=1 >= 0.8x HF fastest, no adapter (batch 1)",
    "runtime K=8 >= 3x PEFT adapter_names K=8 (batch 8)",
    "runtime K=32 >= 3x PEFT adapter_names K=32 (batch 8)",
)


def test_bench_serve_cli_on_a_base_built_in_place(tmp_path):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    args = ["bench", "serve", "--quick", "--repeats", "1", "--size", "tiny", "--build",
            "in-place", "--device", DEVICE, "--new-tokens", "2", "--workdir", str(tmp_path / "w"),
            "--json", str(out), "--plot", str(png)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    _well_formed(data, "serve")
    assert data["settings"]["built"] == "in place" and data["settings"]["rank"] == 16
    names = set(data["results"])
    assert {
        "runtime/K=1/B=8", "runtime/K=8/B=8", "runtime/K=1/B=1", "peft_mixed/K=8/B=8",
        "hf_generate/B=8", "hf_generate/B=1",
    } <= names  # fmt: skip
    assert all(r["tokens_per_s"] > 0 for r in data["results"].values())
    assert set(data["targets"]) == set(SERVE_TARGETS)
    tps = {name: r["tokens_per_s"] for name, r in data["results"].items()}
    assert data["targets"][SERVE_TARGETS[0]]["value"] == pytest.approx(
        tps["runtime/K=8/B=8"] / tps["runtime/K=1/B=8"]
    )
    reference = data["settings"]["hf_reference"]["1"]
    assert data["targets"][SERVE_TARGETS[2]]["value"] == pytest.approx(
        tps["runtime/K=1/B=1"] / tps[reference]
    )
    assert data["targets"][SERVE_TARGETS[4]]["met"] is None  # K=32 does not fit a batch of 8
    for name in SERVE_TARGETS:
        assert name in result.output
    assert "n/a (K=32 not measured)" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_diagnostics_on_a_saved_base(tmp_path, tiny_llama_dir):
    settings = BenchSettings(workdir=tmp_path, base_dir=tiny_llama_dir, quick=True, repeats=1,
                             device=DEVICE)  # fmt: skip
    data = bench.bench_serve(settings, batch=4, new_tokens=2, ks=[2], single=False,
                             diagnostics=True)  # fmt: skip
    _well_formed(data, "serve")
    assert set(data["results"]) == {
        "runtime/K=1/B=4", "runtime/K=2/B=4", "peft_mixed/K=2/B=4", "hf_generate/B=4",
        "base/B=4", "bank/K=1/B=4", "peft_single/K=1/B=4", "bank/K=2/B=4",
        "peft_groups/K=2/B=4",
    }  # fmt: skip
    assert data["settings"]["built"] == "folder"


def test_bench_http(settings):
    result = bench.bench_http(settings, k=2)
    _well_formed(result, "http")
    r = result["results"]
    assert set(r) == {"runtime/B=4", "http/B=4", "http_stream/B=4", "hf_generate/B=4"}
    for kind in ("http/B=4", "http_stream/B=4"):
        assert r[kind]["latency_p99_s"] >= r[kind]["latency_p50_s"] > 0
    stream = r["http_stream/B=4"]
    assert stream["ttft_missing"] == 0
    assert 0 < stream["ttft_p50_s"] <= stream["latency_p99_s"]
    assert set(result["targets"]) == {
        "HTTP >= 0.8x Runtime.generate, same concurrency (4)",
        "HTTP >= 0.8x transformers generate, batch 4, no adapter",
    }


def test_summary_tables_every_target_and_names_missing_results(tmp_path):
    run = {
        "bench": "serve",
        "settings": {"size": "8b", "device": "cuda"},
        "targets": {
            "runtime K=8 >= 0.9x runtime K=1 (batch 32)": bench.target(0.99, ">=", 0.9),
            "runtime K=8 >= 3x PEFT adapter_names K=8 (batch 32)": bench.target(2.4, ">=", 3.0),
            "runtime K=32 >= 3x PEFT adapter_names K=32 (batch 32)": bench.target(
                None, ">=", 3.0, missing="K=32 not measured"
            ),
        },
    }
    (tmp_path / "serve.json").write_text(json.dumps(run))
    merged = tmp_path / "all.json"
    args = ["bench", "summary", str(tmp_path / "serve.json"), str(tmp_path / "gone.json"),
            "--json", str(merged)]  # fmt: skip
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if "runtime K=8 >= 0.9x" in line)
    assert "0.99×" in row and "met by 10%" in row
    row = next(line for line in lines if "runtime K=8 >= 3x" in line)
    assert "2.40×" in row and "missed by 20%" in row
    assert "n/a (K=32 not measured)" in result.output
    assert "gone" in result.output and "missing" in result.output
    assert json.loads(merged.read_text()) == {"results": [run]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["swap", "--size", "8b"], "built in place"),
        (["serve", "--size", "1b", "--build", "folder"], "only built in place"),
    ],
)
def test_sizes_that_exist_only_in_place_are_refused_where_a_folder_is_needed(
    tmp_path, args, message
):
    result = CliRunner().invoke(
        cli, ["bench", *args, "--device", "cpu", "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "hint:" in result.output
    assert not (tmp_path / "bases").exists()  # refused before anything was built


def test_summary_without_files_is_refused():
    result = CliRunner().invoke(cli, ["bench", "summary"])
    assert result.exit_code == 2 and "result file" in result.output


@pytest.mark.parametrize("command", ["swap", "serve", "http", "memory", "train", "summary"])
def test_bench_help(command):
    result = CliRunner().invoke(cli, ["bench", command, "--help"])
    assert result.exit_code == 0 and "--json" in result.output
