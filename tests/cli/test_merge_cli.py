"""`adaptory merge`, `adaptory diff` and the merged / vLLM forms of `adaptory export`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adaptory.adapters.testing import register_lora
from adaptory.cli.main import cli
from adaptory.registry import Registry


@pytest.fixture
def registry(adaptory_home):
    return Registry(adaptory_home)


@pytest.fixture
def pair(registry, tiny_llama_dir):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    register_lora(registry, tiny_llama_dir, "b", seed=2)
    return registry


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_merge_prints_and_records_lineage(pair):
    result = run("merge", "a", "b", "--name", "ab", "--method", "svd", "--weights", "0.6,0.4")
    assert result.exit_code == 0, result.output
    assert "ab:1" in result.output and "distance from" in result.output
    shown = json.loads(run("show", "ab", "--json").output)
    assert [(p["ref"], p["weight"]) for p in shown["parents"]] == [("a:1", 0.6), ("b:1", 0.4)]
    assert shown["training_config"]["merge"]["method"] == "svd"
    as_json = json.loads(run("merge", "a", "b", "--name", "ab", "--method", "cat", "--json").output)
    assert as_json["ref"] == "ab:2" and as_json["fidelity"]["weighted_sum_rel_error"] < 1e-6


def _prefix(registry, base_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    from adaptory.adapters.bases.loading import fingerprint_base, load_base, resolve_base

    loaded = load_base(str(base_dir), task="causal-lm", quant="none", device="cpu")
    model = get_peft_model(
        loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    model.save_pretrained(tmp_path / "p")
    registry.add(
        tmp_path / "p",
        name="p",
        method="prefix",
        task="causal-lm",
        base_model=str(base_dir),
        base_fingerprint=fingerprint_base(resolve_base(str(base_dir))).to_dict(),
    )


REFUSALS = [
    (["a", "b", "--weights", "0.5"], "1 weight(s) for 2 adapters"),
    (["a", "b", "--method", "ties", "--density", "1.5"], "outside (0, 1]"),
    (["a", "b", "--method", "ties", "--density", "0"], "outside (0, 1]"),
    (["a", "b", "--weights", "1,-1"], "negative weight"),
    (["a", "r8"], "needs equal ranks"),
    (["a", "ov"], "same target modules"),
    (["a", "rs"], "rsLoRA"),
    (["a", "dora"], "DoRA"),
    (["a", "pattern"], "rank_pattern"),
    (["a", "bert"], "different bases"),
    (["a", "p"], "only LoRA adapters merge"),
    (["c1", "c2"], "classifies into"),
    (["a"], "at least two"),
    (["a", "b", "--majority-sign", "total"], "no effect with linear"),
]


def test_refusals_leave_the_registry_unchanged(pair, tiny_llama_dir, tiny_bert_dir, tmp_path):
    registry = pair
    register_lora(registry, tiny_llama_dir, "r8", r=8)
    register_lora(registry, tiny_llama_dir, "ov", targets=["o_proj", "v_proj"])
    register_lora(registry, tiny_llama_dir, "rs", use_rslora=True)
    register_lora(registry, tiny_llama_dir, "dora", use_dora=True)
    register_lora(registry, tiny_llama_dir, "pattern", rank_pattern={"q_proj": 2})
    register_lora(registry, tiny_bert_dir, "bert", targets=["query", "value"])
    _prefix(registry, tiny_llama_dir, tmp_path)
    bert = {"task": "seq-cls", "targets": ["query", "value"]}
    register_lora(registry, tiny_bert_dir, "c1", labels=["neg", "pos"], **bert)
    register_lora(registry, tiny_bert_dir, "c2", labels=["pos", "neg"], **bert)
    before = [e.ref for e in registry.list()]
    for args, message in REFUSALS:
        if "--method" not in args:
            args = [*args, "--method", "linear"]
        result = run("merge", *args, "--name", "merged")
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "hint:" in result.output or message == "at least two", (args, result.output)
    assert [e.ref for e in registry.list()] == before


def test_diff_table_and_json(pair):
    result = run("diff", "a", "b", "--top", "2")
    assert result.exit_code == 0, result.output
    assert "same configuration" in result.output and "… 2 more" in result.output
    data = json.loads(run("diff", "a", "b", "--json").output)
    assert data["kind"] == "lora ΔW" and len(data["modules"]) == 4
    assert data["modules"][0]["distance"] >= data["modules"][-1]["distance"]


def test_export_merged_and_vllm(pair, tiny_llama_dir, tmp_path):
    result = run("export", "a", "--merged", "--out", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert "max |Δlogit|" in result.output and "adapter on nf4 base" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = run("export", "a", "--format", "vllm", "--all", "--out", str(tmp_path / "v"))
    assert result.exit_code == 0, result.output
    assert f"vllm serve {tiny_llama_dir} --enable-lora --lora-modules a=" in result.output
    assert "--max-lora-rank 8 --max-loras 2" in result.output
    result = run("export", "--format", "vllm", "--all", "--base", str(tiny_llama_dir), "--out",
                 str(tmp_path / "w"))  # fmt: skip
    assert result.exit_code == 0 and (tmp_path / "w" / "b" / "adapter_config.json").is_file()
    plain = run("export", "a", "--out", str(tmp_path / "plain"))
    assert plain.exit_code == 0 and (tmp_path / "plain" / "README.md").is_file()
    mixed = run("export", "a", "--merged", "--format", "vllm", "--out", str(tmp_path / "x"))
    assert mixed.exit_code == 2 and "exclude each other" in mixed.output
