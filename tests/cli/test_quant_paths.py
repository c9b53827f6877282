"""`--quant fp4` and `--quant int8` through train, serve and export, on the tiny Llama base.

Each step is checked against transformers + bitsandbytes loading the base themselves
(BitsAndBytesConfig, not Adaptory's loader) and PEFT running the adapter:
- train: the first step's loss is the plain base's loss on those rows, quantized that way (LoRA
  B starts at zero), and differs from the NF4 one, so the quantization really was used;
- serve: what `adaptory serve --quant Q` builds (build_runtimes(quant=Q)) answers a greedy
  completion with PEFT's tokens on the Q base;
- export --merged: fp4 merges into the FP4 round trip of the base (equal to the adapter on its
  FP4 base); int8 has no 4-bit round trip, says so, and equals the adapter on the original base.

int8 runs on the CPU here (bitsandbytes >= 0.45 has a CPU backend for it), only slowly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from serving_helpers import fp32_4bit_reference

from adaptory.cli.main import cli
from adaptory.registry import Registry

ROWS = ["the cat sat on the mat", "the dog ran to the park", "a red ball and a blue box",
        "the shop sells books, lamps, shoes and tea"]  # fmt: skip
PROMPTS = ["the cat", "a red ball and"]
SERVE_PROMPTS = ["the", "the shop sells", "great product"]  # where fp4/int8 and nf4 part ways
LABEL = {"fp4": "fp4+dq", "int8": "int8"}


def oracle_model(base_dir: Path, quant: str):
    """The base as transformers + bitsandbytes load it for `quant` (fp32 compute, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "none":
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["lm_head"],
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=config, device_map={"": "cpu"}, dtype=torch.float32
    ).eval()
    return fp32_4bit_reference(model)


def text_rows_loss(model, tokenizer) -> float:
    """Mean next-token loss over ROWS as `text` data: special tokens + eos, right-padded."""
    import torch

    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in ROWS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = (
            torch.tensor(row), torch.tensor(row), 1
        )  # fmt: skip
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def last_logits(model, tokenizer, prompt: str):
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def greedy(model, tokenizer, prompt: str, n: int) -> str:
    import torch

    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """Both quantizations trained through the CLI: {quant: (home, entry)}."""
    root = tmp_path_factory.mktemp("quant")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ROWS))
    out = {}
    for quant in ("fp4", "int8"):
        home = root / f"home-{quant}"
        result = CliRunner().invoke(cli, [
            "--home", str(home), "train", "--base", str(tiny_llama_dir), "--data", str(data),
            "--name", f"q-{quant}", "--quant", quant, "--max-steps", "2", "--batch-size", "4",
            "--eval-split", "0", "--lr", "0.05", "--json",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        out[quant] = (home, Registry(home).resolve(f"q-{quant}"))
    return out


@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_training_runs_on_the_chosen_quantization(trained, tiny_llama_dir, quant):
    from transformers import AutoTokenizer

    _, entry = trained[quant]
    assert entry.base_fingerprint["quant"] == LABEL[quant]
    assert entry.training_config["quant"] == quant
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    first = entry.loss_history[0]
    assert first["step"] == 1
    # in train mode, as training runs it: bitsandbytes' int8 layers take another path there
    want = text_rows_loss(oracle_model(tiny_llama_dir, quant).train(), tokenizer)
    assert first["loss"] == pytest.approx(want, abs=2e-5)
    on_nf4 = text_rows_loss(oracle_model(tiny_llama_dir, "nf4").train(), tokenizer)
    assert abs(want - on_nf4) > 2e-4, "this base gives nf4 the same loss: the check tells nothing"


@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_serving_with_that_quantization_gives_peft_greedy_tokens(trained, tiny_llama_dir, quant):
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoTokenizer

    from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app

    home, entry = trained[quant]
    reg = Registry(home)
    runtimes = build_runtimes(reg, preload=[entry.ref], quant=quant)
    app = create_app(runtimes, registry=reg, settings=ServerSettings(batch_window_ms=5))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    reference = PeftModel.from_pretrained(
        oracle_model(tiny_llama_dir, quant), str(reg.files(entry))
    ).eval()
    on_nf4 = PeftModel.from_pretrained(oracle_model(tiny_llama_dir, "nf4"), str(reg.files(entry)))
    differs = False
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["bases"][str(tiny_llama_dir)]["resident"] == [entry.ref]
        for prompt in SERVE_PROMPTS:
            body = {"model": entry.name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["adapter"] == entry.ref
            text = response.json()["choices"][0]["text"]
            assert text == greedy(reference, tokenizer, prompt, 16), prompt
            differs |= text != greedy(on_nf4.eval(), tokenizer, prompt, 16)
    assert differs, "on these prompts nf4 gives the same tokens: the check tells nothing"


def test_serve_cli_accepts_fp4_and_int8(tmp_path):
    """The flag itself: both values parse (the run above uses what the flag builds)."""
    for quant in ("fp4", "int8"):
        result = CliRunner().invoke(cli, ["serve", "--quant", quant, "--help"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["serve", "--quant", "int4", "--base", "x"])
    assert result.exit_code == 2 and "'int4' is not one of" in result.output


def _export(home: Path, ref: str, out: Path) -> dict:
    result = CliRunner().invoke(
        cli, ["--home", str(home), "export", ref, "--merged", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _max_diff(a, b, tokenizer) -> float:
    return max(
        float((last_logits(a, tokenizer, p) - last_logits(b, tokenizer, p)).abs().max())
        for p in PROMPTS
    )


def test_fp4_merged_export_equals_the_adapter_on_its_fp4_base(trained, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, entry = trained["fp4"]
    report = _export(home, entry.ref, tmp_path / "m")
    assert (report["trained_quant"], report["from_weights"], report["note"]) == (
        "fp4", "fp4-roundtrip", None
    )  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    files = str(Registry(home).files(entry))
    on_fp4 = PeftModel.from_pretrained(oracle_model(tiny_llama_dir, "fp4"), files).eval()
    on_nf4 = PeftModel.from_pretrained(oracle_model(tiny_llama_dir, "nf4"), files).eval()
    close = _max_diff(merged, on_fp4, tokenizer)
    assert close < 1e-4
    assert _max_diff(merged, on_nf4, tokenizer) > 100 * close  # it is FP4's round trip


def test_int8_merged_export_says_it_merged_into_the_original_weights(
    trained, tiny_llama_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, entry = trained["int8"]
    report = _export(home, entry.ref, tmp_path / "m")
    assert (report["trained_quant"], report["from_weights"]) == ("int8", "original")
    assert report["note"] == (
        f"{entry.ref} was trained on a int8 base: no 4-bit round trip applies, merged into "
        "the original weights"
    )
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    files = str(Registry(home).files(entry))
    on_original = PeftModel.from_pretrained(oracle_model(tiny_llama_dir, "none"), files).eval()
    on_int8 = PeftModel.from_pretrained(oracle_model(tiny_llama_dir, "int8"), files).eval()
    close = _max_diff(merged, on_original, tokenizer)
    assert close < 1e-4
    assert _max_diff(merged, on_int8, tokenizer) > 100 * close  # int8 error was not merged in
