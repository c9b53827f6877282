"""Merged export (QLoRA round trip, verification) and vLLM multi-LoRA export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adaptory.adapters.bases.quantize import quantized_weights, round_trip_base
from adaptory.adapters.merging.export import adapters_of_base, export_merged, export_vllm
from adaptory.adapters.testing import register_lora
from adaptory.registry import Registry
from adaptory.registry.errors import ConfigError


@pytest.fixture
def registry(adaptory_home):
    return Registry(adaptory_home)


def test_round_trip_reproduces_the_4bit_weights(tiny_llama_dir):
    import bitsandbytes.functional as bnbf

    from adaptory.adapters.bases.loading import load_base

    quantized = load_base(str(tiny_llama_dir), task="causal-lm", quant="nf4", device="cpu")
    plain = load_base(str(tiny_llama_dir), task="causal-lm", quant="none", device="cpu")
    specs = quantized_weights(quantized.model)
    assert round_trip_base(plain.model, specs) == len(specs) == 14  # lm_head stays unquantized
    layer = quantized.model.model.layers[1].mlp.down_proj
    seen = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(seen, plain.model.model.layers[1].mlp.down_proj.weight)


def test_merged_export_loads_without_peft_and_matches(registry, tiny_llama_dir, tmp_path):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    default = export_merged(registry, "a", tmp_path / "rt")
    original = export_merged(registry, "a", tmp_path / "orig", from_weights="original")
    assert default.from_weights == "nf4-roundtrip" and original.from_weights == "original"
    rt_q = default.verification["vs_adapter_on_quantized_base"]
    orig_q = original.verification["vs_adapter_on_quantized_base"]
    orig_o = original.verification["vs_adapter_on_original_base"]
    assert rt_q["max_abs_dlogit"] < 1e-4 and rt_q["mean_kl"] < 1e-9  # what training saw
    assert orig_o["max_abs_dlogit"] < 1e-4  # the plain merge of the adapter
    assert orig_q["mean_kl"] > 100 * rt_q["mean_kl"]  # the QLoRA caveat, measured
    exports = registry.resolve("a").extra["merged_exports"]
    assert [e["from_weights"] for e in exports] == ["nf4-roundtrip", "original"]
    assert not (tmp_path / "rt" / "adapter_config.json").exists()
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "rt").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"p = {str(tmp_path / 'rt')!r}; m = AutoModelForCausalLM.from_pretrained(p); "
        "t = AutoTokenizer.from_pretrained(p); "
        "out = m(**t('the cat sat', return_tensors='pt')).logits; "
        "assert torch.isfinite(out).all(); print('peft' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_merged_classifier_keeps_its_head(registry, tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    labels = ["negative", "positive"]
    register_lora(
        registry, tiny_bert_dir, "c", task="seq-cls", labels=labels, targets=["query", "value"]
    )
    result = export_merged(registry, "c", tmp_path / "c", dtype="bfloat16")
    assert result.verification["vs_adapter_on_quantized_base"]["max_abs_dlogit"] < 0.05
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.dtype == torch.bfloat16


def test_vllm_export_writes_folders_and_the_command(
    registry, tiny_llama_dir, tiny_bert_dir, tmp_path
):
    register_lora(registry, tiny_llama_dir, "a", seed=1)
    register_lora(registry, tiny_llama_dir, "b", seed=2, r=16)
    register_lora(
        registry, tiny_bert_dir, "c", task="seq-cls", labels=["x", "y"], targets=["query"]
    )
    entries = adapters_of_base(registry, registry.resolve("a"))
    assert [e.name for e in entries] == ["a", "b"]
    result = export_vllm(registry, entries, tmp_path / "v")
    for name in ("a", "b"):
        folder = tmp_path / "v" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_llama_dir)
    assert result.max_lora_rank == 16
    assert result.command == (
        f"vllm serve {tiny_llama_dir} --enable-lora --lora-modules "
        f"a={tmp_path / 'v' / 'a'} b={tmp_path / 'v' / 'b'} --max-lora-rank 16 --max-loras 2"
    )
    with pytest.raises(ConfigError, match="generation"):
        export_vllm(registry, [registry.resolve("c")], tmp_path / "w")


def test_dora_is_refused_by_vllm_export(registry, tiny_llama_dir, tmp_path):
    register_lora(registry, tiny_llama_dir, "d", use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        export_vllm(registry, [registry.resolve("d")], tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_peft_export_of_a_classifier_carries_its_label_map(registry, tiny_bert_dir, tmp_path):
    """The exported folder says which output is which class, in a file and in the card, and the
    card's recipe (labels.json + PeftModel) gives the adapter's own predictions by name."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adaptory.registry.export import export_peft

    labels = ["billing", "shipping", "refund"]
    entry = register_lora(
        registry, tiny_bert_dir, "c", task="seq-cls", labels=labels, targets=["query", "value"]
    )
    out = export_peft(registry, entry, tmp_path / "c")
    label_map = json.loads((out / "labels.json").read_text())
    assert label_map == {
        "id2label": {"0": "billing", "1": "shipping", "2": "refund"},
        "label2id": {"billing": 0, "shipping": 1, "refund": 2},
    }
    card = (out / "README.md").read_text()
    assert "## Labels\n\n- 0: billing\n- 1: shipping\n- 2: refund" in card
    assert "AutoModelForSequenceClassification" in card and "AutoModelForCausalLM" not in card

    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir,
        num_labels=3,
        id2label={int(i): label for i, label in label_map["id2label"].items()},
        label2id=label_map["label2id"],
    )
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["the parcel never came", "charged twice", "money back please"]
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    named = [model.config.id2label[int(i)] for i in logits.argmax(-1)]

    from adaptory.adapters.serving.runtime import Runtime

    runtime = Runtime(str(tiny_bert_dir), registry=registry, task="seq-cls", quant="none")
    served = [r["label"] for r in runtime.classify(entry.ref, texts)]
    assert named == served


def test_the_card_of_an_adapter_for_a_builtin_base_names_its_hub_id(tmp_path):
    """`minilm` is Adaptory's name; the card's base_model must be an id others can load."""
    from click.testing import CliRunner

    from adaptory.cli.main import cli
    from adaptory.registry.testing import make_lora_folder

    home = tmp_path / "home"
    Registry(home).add(make_lora_folder(tmp_path / "src"), name="m", base_model="minilm")
    result = CliRunner().invoke(
        cli, ["--home", str(home), "export", "m", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    card = (tmp_path / "x" / "README.md").read_text()
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in card
    assert "- base model: minilm (`sentence-transformers/all-MiniLM-L6-v2`)" in card


def test_merged_export_of_a_classifier_says_how_to_load_a_classifier(tiny_bert_dir, tmp_path):
    from click.testing import CliRunner

    from adaptory.cli.main import cli

    home = tmp_path / "home"
    register_lora(Registry(home), tiny_bert_dir, "c", task="seq-cls", labels=["a", "b"],
                  targets=["query"])  # fmt: skip
    out = tmp_path / "merged"
    args = ["--home", str(home), "export", "c", "--merged", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "load it with: AutoModelForSequenceClassification.from_pretrained(path)" in result.output
    assert "AutoModelForCausalLM" not in result.output
