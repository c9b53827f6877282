"""Merging LoRA adapters (adapters.merge) and diffing them (adapters.diff) on tiny bases."""

from __future__ import annotations

import json

import pytest
import torch

from adaptory.adapters.merging.compare import load_entry_model, prompt_logits
from adaptory.adapters.merging.diff import diff_adapters
from adaptory.adapters.merging.merge import COMBINATIONS, merge_adapters
from adaptory.adapters.testing import register_lora
from adaptory.registry import Registry

PROMPTS = ["the cat sat on the mat.", "Shout: the dog ran\nAnswer:"]


@pytest.fixture
def registry(adaptory_home):
    return Registry(adaptory_home)


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"prompt": f"Shout: the cat sat {i}\nAnswer:", "completion": " THE CAT SAT"}
        for i in range(3)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def max_distance(registry, a, b) -> float:
    return max(m.distance for m in diff_adapters(registry, a, b).modules)


def test_every_method_merges_into_a_loadable_adapter(registry, tiny_llama_dir):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    register_lora(registry, tiny_llama_dir, "b", seed=2)
    for method in COMBINATIONS:
        result = merge_adapters(
            registry, ["a", "b"], name=f"m-{method}", method=method, evaluate=False
        )
        assert result.entry.method == "lora"
        assert result.entry.peft_config["r"] == (8 if method == "cat" else 4)
    model, loaded = load_entry_model(registry, registry.resolve("m-dare_ties_svd"))
    logits = prompt_logits(model, loaded.tokenizer, PROMPTS)
    assert all(torch.isfinite(x).all() for x in logits)


def test_self_merge_at_half_weights_is_the_adapter(registry, tiny_llama_dir):
    """An adapter merged with itself at 0.5/0.5 is that adapter, for linear (factors combined
    with weight wᵢ: Adaptory hands PEFT wᵢ², which it square-roots) as for svd and cat (ΔW
    combined directly); 1.0/1.0 with linear doubles each factor, so ΔW quadruples."""
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    norm = max(m.norm_a for m in diff_adapters(registry, "a", "a").modules)
    merge_adapters(
        registry, ["a", "a"], name="double", method="linear", weights=[1.0, 1.0], evaluate=False
    )
    quadrupled = diff_adapters(registry, "double", "a").modules
    assert all(m.norm_a == pytest.approx(4 * m.norm_b, rel=1e-5) for m in quadrupled)
    assert all(m.cosine == pytest.approx(1.0, abs=1e-6) for m in quadrupled)
    for method in ("linear", "svd", "cat"):
        merge_adapters(
            registry, ["a", "a"], name=method, method=method, weights=[0.5, 0.5], evaluate=False
        )
        assert max_distance(registry, method, "a") < 1e-5 * norm


def test_cat_equals_both_adapters_active(registry, tiny_llama_dir):
    from peft import PeftModel

    from adaptory.adapters.bases.loading import load_base

    a = register_lora(registry, tiny_llama_dir, "a", seed=1)
    b = register_lora(registry, tiny_llama_dir, "b", seed=2, r=8)  # cat takes different ranks
    result = merge_adapters(
        registry, ["a", "b"], name="ab", method="cat", weights=[1, 1], evaluate=False
    )
    assert result.fidelity["weighted_sum_rel_error"] < 1e-6  # ΔW_cat == ΔW_a + ΔW_b
    assert result.entry.peft_config["r"] == 12

    loaded = load_base(str(tiny_llama_dir), task="causal-lm", quant="none", device="cpu")
    both = PeftModel.from_pretrained(loaded.model, str(registry.files(a)), adapter_name="a")
    both.load_adapter(str(registry.files(b)), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    expected = prompt_logits(both, loaded.tokenizer, PROMPTS)
    merged, _ = load_entry_model(registry, result.entry, quant="none")
    got = prompt_logits(merged, loaded.tokenizer, PROMPTS)
    for x, y in zip(expected, got, strict=True):
        assert torch.allclose(x, y, atol=1e-4)


def test_cat_subtracts_exactly_with_a_negative_weight(registry, tiny_llama_dir):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    merge_adapters(registry, ["a", "a"], name="zero", method="cat", weights=[1, -1], evaluate=False)
    assert max(m.norm_a for m in diff_adapters(registry, "zero", "a").modules) < 1e-5


def test_lineage_method_and_metrics_next_to_the_parents(registry, tiny_llama_dir, eval_file):
    a = register_lora(registry, tiny_llama_dir, "a", seed=1, eval_file=eval_file)
    b = register_lora(registry, tiny_llama_dir, "b", seed=2, eval_file=eval_file)
    merge_adapters(
        registry, ["a", "b:1"], name="mix", method="ties", weights=[0.7, 0.3], density=0.8,
        majority_sign="frequency",
    )  # fmt: skip
    entry = registry.resolve("mix")
    assert entry.parents == [
        {"ref": "a:1", "digest": a.digest, "weight": 0.7},
        {"ref": "b:1", "digest": b.digest, "weight": 0.3},
    ]
    merge = entry.training_config["merge"]
    assert merge["method"] == "ties" and merge["density"] == 0.8
    assert merge["majority_sign"] == "frequency"
    assert entry.extra["merge"]["fidelity"]["modules"] == 4
    assert entry.base_fingerprint == a.base_fingerprint
    assert set(entry.metrics["parents"]) == {"a:1", "b:1"}
    assert entry.metrics["parents"]["a:1"]["eval_loss"] > 0
    assert entry.metrics["on_parent_data"]["b:1"]["eval_loss"] == entry.metrics["eval_loss"]
    assert entry.dataset["eval_file"] == str(eval_file)


def test_each_parent_is_scored_on_its_own_eval_data(registry, tiny_llama_dir, tmp_path):
    """Parents with different eval files: the merged adapter is scored on each, with no single
    top-level score; a parent without eval data is left out, and the parents after it are
    still scored. Unnamed, the merge is described by its method and parents."""
    files = {}
    for name, answer in (("a", " THE CAT SAT"), ("b", " the dog ran")):
        files[name] = tmp_path / f"{name}.jsonl"
        rows = [{"prompt": f"Say {i}:", "completion": answer} for i in range(2)]
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
        register_lora(registry, tiny_llama_dir, name, seed=len(files), eval_file=files[name])
    register_lora(registry, tiny_llama_dir, "c", seed=3)  # no eval data
    result = merge_adapters(registry, ["a", "c", "b"], name="acb", method="cat")
    metrics = result.entry.metrics
    assert set(metrics["parents"]) == set(metrics["on_parent_data"]) == {"a:1", "b:1"}
    for ref, name in (("a:1", "a"), ("b:1", "b")):
        assert metrics["parents"][ref]["data"] == str(files[name])
        assert metrics["on_parent_data"][ref]["data"] == str(files[name])
    assert metrics["on_parent_data"]["a:1"] != metrics["on_parent_data"]["b:1"]
    assert "eval_loss" not in metrics
    assert result.entry.description == "cat merge of a:1, c:1, b:1"


def test_classifier_merge_averages_the_heads(registry, tiny_bert_dir):
    labels = ["negative", "positive"]
    kwargs = {"task": "seq-cls", "labels": labels, "targets": ["query", "value"]}
    register_lora(registry, tiny_bert_dir, "c", seed=1, **kwargs)
    result = merge_adapters(registry, ["c", "c"], name="cc", method="cat", evaluate=False)
    assert result.entry.extra["labels"] == labels
    assert result.entry.peft_config["modules_to_save"] == ["classifier", "score"]
    model, loaded = load_entry_model(registry, registry.resolve("c"))
    merged, _ = load_entry_model(registry, result.entry)
    texts = ["great product", "it broke after a week"]
    for x, y in zip(
        prompt_logits(model, loaded.tokenizer, texts),
        prompt_logits(merged, loaded.tokenizer, texts),
        strict=True,
    ):
        assert torch.allclose(x, y, atol=1e-4)


def test_diff_sorts_modules_by_distance(registry, tiny_llama_dir):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    register_lora(registry, tiny_llama_dir, "b", seed=2, r=8, targets=["q_proj", "o_proj"])
    diff = diff_adapters(registry, "a", "b")
    fields = {row["field"] for row in diff.config}
    assert {"r", "lora_alpha", "target_modules"} <= fields
    distances = [m.distance for m in diff.modules]
    assert distances == sorted(distances, reverse=True)
    only_b = [m for m in diff.modules if m.module.endswith("o_proj")]
    assert only_b and all(m.norm_a == 0 and m.cosine is None for m in only_b)
    same = diff_adapters(registry, "a", "a")
    assert same.config == [] and all(m.cosine == pytest.approx(1.0) for m in same.modules)


def _tf32(x):
    """Round float32 values to TF32's 10-bit mantissa, as CUDA's TF32 matmuls do to inputs."""
    import torch

    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_the_cat_check_does_not_use_the_device_matmul(tiny_llama_dir, tmp_path, monkeypatch):
    """On CUDA, PEFT's get_delta_weight runs B·A as a TF32 matmul (~3e-3 off), which made the
    automatic check refuse every exact `cat`. No CPU runs TF32, so PEFT's product is replaced
    by a faithful emulation (inputs rounded to 10 mantissa bits); the check, done in float64
    from A and B, must not move."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import layer as lora_layer
    from serving_helpers import make_lora
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.merging.merge import EXACT_TOLERANCE, measure_fidelity

    def tf32_delta(self, adapter):
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (_tf32(b) @ _tf32(a)) * self.scaling[adapter]

    folders = [make_lora(tiny_llama_dir, tmp_path / f"p{i}", seed=i) for i in (1, 2)]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a")
    model.load_adapter(str(folders[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type="cat")
    monkeypatch.setattr(lora_layer.Linear, "get_delta_weight", tf32_delta)
    rel = measure_fidelity(model, ["a", "b"], [0.7, 0.3], "merged")["weighted_sum_rel_error"]
    assert rel < EXACT_TOLERANCE / 100, rel
    # what the check computed before (PEFT's product, then float64) is over the tolerance
    err, ref = _peft_distance(model, {"a": 0.7, "b": 0.3})
    assert (err / ref) ** 0.5 > EXACT_TOLERANCE


def test_fidelity_is_the_relative_distance_of_an_inexact_merge(tiny_llama_dir, tmp_path):
    """`linear` is not Σ w_i·ΔW_i (it mixes A and B separately): measure_fidelity equals the
    relative Frobenius distance computed here from PEFT's own get_delta_weight, for deltas
    whose squared norm is below 1 (so an absolute distance would differ from the relative one)."""
    import torch
    from peft import PeftModel
    from serving_helpers import make_lora
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.merging.merge import measure_fidelity

    folders = [make_lora(tiny_llama_dir, tmp_path / f"p{i}", seed=i) for i in (3, 4)]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a")
    model.load_adapter(str(folders[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.03, 0.02], "merged", combination_type="linear")
    err, ref = _peft_distance(model, {"a": 0.03, "b": 0.02})
    assert 0 < ref < 1 and err > 0, (ref, err)  # a real, small, inexact case
    measured = measure_fidelity(model, ["a", "b"], [0.03, 0.02], "merged")
    assert measured["weighted_sum_rel_error"] == pytest.approx((err / ref) ** 0.5, rel=1e-4)


def _peft_distance(model, weights: dict[str, float]) -> tuple[float, float]:
    """(‖ΔW_merged − Σ w·ΔW‖², ‖Σ w·ΔW‖²) over every merged LoRA layer, from PEFT's own
    get_delta_weight in float64: the oracle for measure_fidelity."""
    import torch
    from peft.tuners.lora import layer as lora_layer

    err = ref = 0.0
    for module in model.modules():
        if isinstance(module, lora_layer.Linear) and "merged" in module.lora_A:
            with torch.no_grad():
                got = module.get_delta_weight("merged").double()
                want = sum(w * module.get_delta_weight(n).double() for n, w in weights.items())
            err += float(((got - want) ** 2).sum())
            ref += float((want**2).sum())
    return err, ref


def test_the_merge_names_the_first_parents_base(registry, tiny_llama_dir, tmp_path):
    """Parents may name one base (same fingerprint) by different paths: the merged entry and its
    adapter_config.json name the first parent's, in the order the parents were given."""
    import shutil

    copy = shutil.copytree(tiny_llama_dir, tmp_path / "same-base-elsewhere")
    a = register_lora(registry, tiny_llama_dir, "a", seed=1)
    b = register_lora(registry, copy, "b", seed=2)
    assert a.base_fingerprint == b.base_fingerprint and a.base_model != b.base_model
    for first, second in ((a, b), (b, a)):
        refs = [first.name, second.name]
        merged = merge_adapters(registry, refs, name="-".join(refs), method="cat", evaluate=False)
        entry = merged.entry
        config = json.loads((registry.files(entry) / "adapter_config.json").read_text())
        named = config["base_model_name_or_path"]
        assert entry.base_model == first.base_model
        assert named == first.peft_config["base_model_name_or_path"]
        assert named != second.peft_config["base_model_name_or_path"]
