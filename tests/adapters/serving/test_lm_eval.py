"""lm-eval through the server equals lm-eval's own HF backend with the adapter loaded by PEFT.

The real lm-eval drives a real uvicorn on 127.0.0.1 (`local-completions`, batches of 4) on the
two local tasks in lmeval_tasks/: one generate_until, one multiple-choice (loglikelihood). The
oracle is lm-eval's `hf` model with `peft=` the adapter's stored PEFT folder, on the same
unquantized fp32 base (served with quant="none"; one test compares the default NF4 serving with
the HF backend on the same NF4 base). Every sample is compared: the generated text, each
choice's loglikelihood and is_greedy, each metric. The LoRA is trained on the task for a few
steps first, so that some answers are right and some choices greedy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from click.testing import CliRunner
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.tasks import TaskManager
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from serving_helpers import fp32_4bit_reference, register
from transformers import AutoModelForCausalLM, AutoTokenizer

from adaptory.adapters.bench import lmeval
from adaptory.cli.main import cli
from adaptory.registry import Registry

TASKS = Path(__file__).parent / "lmeval_tasks"

GEN, CHOICE = "adaptory_reverse_gen", "adaptory_reverse_choice"
BATCH = 4
LIMIT = 8
DEVICE = os.environ.get("ADAPTORY_DEVICE", "cpu")  # the server's (tests/conftest.py)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def train(base_dir: Path, out: Path, config, *, lr: float, steps: int = 100) -> Path:
    """An adapter trained (seeded, full batch) on the generation task's answers: the LoRA
    gets some of them right, so exact_match and is_greedy take both values."""
    spec = importlib.util.spec_from_file_location("reverse_data", TASKS / "reverse_data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = []
    for doc in data.make_docs()[0]:
        prompt = tokenizer(doc["question"] + "\nAnswer:").input_ids
        answer = tokenizer(" " + doc["answer"] + "\n").input_ids
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([la + [-100] * (width - len(la)) for _, la in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tasks():
    """Only the local tasks (lm-eval's own thousands are not indexed)."""
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("lmeval")
    reg = Registry(root / "home")
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    register(reg, train(tiny_llama_dir, root / "lora", lora, lr=3e-3), "lora", tiny_llama_dir)
    register(
        reg, train(tiny_llama_dir, root / "pfx", prefix, lr=3e-2, steps=200), "pfx", tiny_llama_dir
    )
    return reg


def run(tasks, names, model, args) -> dict:
    """{task: its samples in doc order} from one lm-eval run."""
    results = lm_eval.simple_evaluate(
        model=model, model_args=args, tasks=names, task_manager=tasks, log_samples=True
    )
    return {name: sorted(results["samples"][name], key=lambda s: s["doc_id"]) for name in names}


def via_server(registry, tasks, ref, names, tokenizer="base", **extra) -> dict:
    with lmeval.served(registry, ref, quant="none") as served:
        args = lmeval.model_args(served, tokenizer=tokenizer, batch_size=BATCH) | extra
        return run(tasks, names, "local-completions", args)


_HF: dict = {}


def via_hf(registry, tasks, ref, names, base_dir) -> dict:
    """lm-eval's HF backend: the base in fp32, the adapter's stored folder through PEFT."""
    key = (str(registry.home), ref, tuple(names))
    if key not in _HF:
        folder = registry.files(registry.resolve(ref), verify=True)
        args = {
            "pretrained": str(base_dir), "peft": str(folder), "dtype": "float32",
            "device": DEVICE, "batch_size": BATCH,
        }  # fmt: skip
        _HF[key] = run(tasks, names, "hf", args)
    return _HF[key]


def loglikelihoods(sample) -> list[float]:
    return [float(lp) for lp, _greedy in sample["filtered_resps"]]


def assert_same_choices(got: list, want: list) -> None:
    """Each choice's loglikelihood (to fp32 rounding) and is_greedy, and acc, acc_norm exactly."""
    assert len(got) == len(want) == 24
    for ours, theirs in zip(got, want, strict=True):
        where = f"{CHOICE} doc {ours['doc_id']}"
        assert ours["doc_id"] == theirs["doc_id"] and ours["arguments"] == theirs["arguments"]
        for ll, want_ll in zip(loglikelihoods(ours), loglikelihoods(theirs), strict=True):
            assert math.isclose(ll, want_ll, rel_tol=0, abs_tol=1e-4), (where, ll, want_ll)
        greedy = [g for _lp, g in ours["filtered_resps"]]
        assert greedy == [g for _lp, g in theirs["filtered_resps"]], where
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"]), where


def assert_same_generations(got: list, want: list[str]) -> None:
    assert len(got) == len(want) == 24
    for sample, text in zip(got, want, strict=True):
        assert sample["filtered_resps"] == [text], f"{GEN} doc {sample['doc_id']}"


def assert_same_exact_matches(got: list, want: list) -> None:
    """Equal per sample, and not all equal: some answers right and some wrong."""
    assert [s["exact_match"] for s in got] == [s["exact_match"] for s in want]
    assert 0 < sum(s["exact_match"] for s in want) < len(want)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"tokenized_requests": False}],  # token-id prompts; text prompts (counted here)
    ids=["token-ids", "text-prompts"],
)
def test_lora_scores_equal_the_hf_backend_with_peft(registry, tasks, tiny_llama_dir, extra):
    got = via_server(registry, tasks, "lora", [GEN, CHOICE], **extra)
    want = via_hf(registry, tasks, "lora", [GEN, CHOICE], tiny_llama_dir)
    assert_same_generations(got[GEN], [s["filtered_resps"][0] for s in want[GEN]])
    assert_same_exact_matches(got[GEN], want[GEN])
    assert_same_choices(got[CHOICE], want[CHOICE])
    # choices greedy and not: the is_greedy comparison means something
    assert {g for s in want[CHOICE] for _lp, g in s["filtered_resps"]} == {True, False}


@pytest.mark.slow
def test_lora_generations_without_a_tokenizer_equal_the_hf_backend(registry, tasks, tiny_llama_dir):
    """No tokenizer on lm-eval's side: text prompts, generation tasks only."""
    got = via_server(registry, tasks, "lora", [GEN], "none")
    want = via_hf(registry, tasks, "lora", [GEN, CHOICE], tiny_llama_dir)
    assert_same_generations(got[GEN], [s["filtered_resps"][0] for s in want[GEN]])
    assert_same_exact_matches(got[GEN], want[GEN])


@pytest.mark.slow
def test_lora_scores_through_the_servers_tokenizer_equal_the_hf_backend(
    registry, tasks, tiny_llama_dir
):
    """lm-eval's remote tokenizer (`--tokenizer server`): GET /tokenizer_info, POST /tokenize."""
    got = via_server(registry, tasks, "lora", [GEN, CHOICE], "server")
    want = via_hf(registry, tasks, "lora", [GEN, CHOICE], tiny_llama_dir)
    assert_same_generations(got[GEN], [s["filtered_resps"][0] for s in want[GEN]])
    assert_same_exact_matches(got[GEN], want[GEN])
    assert_same_choices(got[CHOICE], want[CHOICE])


@pytest.mark.slow
def test_prefix_loglikelihoods_equal_the_hf_backend_with_peft(registry, tasks, tiny_llama_dir):
    """lm-eval's HF backend scores with PEFT's forward, which applies the prefix."""
    got = via_server(registry, tasks, "pfx", [CHOICE])
    assert_same_choices(
        got[CHOICE], via_hf(registry, tasks, "pfx", [CHOICE], tiny_llama_dir)[CHOICE]
    )


def peft_forward_greedy(base_dir: Path, folder: Path, prompt: str, max_tokens: int) -> str:
    """lm-eval's generate_until, with PEFT's forward in place of its generate (which leaves
    prefix key/values out): greedy over full forward passes, decoded, cut at the stops."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base.to(DEVICE), str(folder)).eval()
    ids, out = tokenizer(prompt).input_ids, []
    with torch.inference_mode():
        for _ in range(max_tokens):
            step = model(input_ids=torch.tensor([ids + out], device=DEVICE)).logits[0, -1]
            out.append(int(step.argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
    text = tokenizer.decode(out, skip_special_tokens=True)
    return postprocess_generated_text(text, ["\n", ".", tokenizer.eos_token], None)


@pytest.mark.slow
def test_prefix_generations_equal_greedy_peft_forward(registry, tasks, tiny_llama_dir):
    got = via_server(registry, tasks, "pfx", [GEN])[GEN]
    folder = registry.files(registry.resolve("pfx"), verify=True)
    want = [peft_forward_greedy(tiny_llama_dir, folder, s["arguments"][0][0], 8) for s in got]
    assert_same_generations(got, want)


@pytest.mark.slow
def test_each_adapter_changes_the_scores(registry, tasks, tiny_llama_dir):
    """Served plain, the base scores every choice differently from either adapter."""
    plain = via_server(registry, tasks, f"base:{tiny_llama_dir}", [CHOICE])[CHOICE]
    for ref in ("lora", "pfx"):
        adapted = via_hf(registry, tasks, ref, [CHOICE], tiny_llama_dir)[CHOICE]
        for a, b in zip(plain, adapted, strict=True):
            assert all(
                abs(x - y) > 1e-3 for x, y in zip(loglikelihoods(a), loglikelihoods(b), strict=True)
            )


@pytest.mark.slow
def test_eval_command_prints_lm_evals_scores(registry, tasks, tiny_llama_dir):
    """`adaptory eval REF --lm-eval TASK`: lm-eval's table of the served scores, which are the
    HF backend's."""
    args = [
        "--home", str(registry.home), "eval", "pfx", "--lm-eval", CHOICE, "--limit", str(LIMIT),
        "--include-path", str(TASKS), "--quant", "none", "--batch-size", "3",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [line.replace(" ", "").split("|") for line in result.stdout.splitlines()]
    shown = {
        row[5]: float(row[7]) for row in rows if len(row) > 8 and row[5] in ("acc", "acc_norm")
    }
    want = via_hf(registry, tasks, "pfx", [CHOICE], tiny_llama_dir)[CHOICE][:LIMIT]
    means = {m: round(sum(s[m] for s in want) / LIMIT, 4) for m in ("acc", "acc_norm")}
    assert shown == means and 0 < means["acc"] < 1


def test_eval_command_without_lm_eval_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets uninstalled
    args = ["--home", str(tmp_path), "eval", "lora", "--lm-eval", CHOICE]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "lm-eval is not installed: pip install 'adaptory[eval]'" in result.output


def test_eval_command_refuses_unknown_tasks_and_both_sources(tmp_path):
    home = ["--home", str(tmp_path)]
    unknown = CliRunner().invoke(cli, [*home, "eval", "lora", "--lm-eval", "no_such_task_x"])
    assert unknown.exit_code == 3 and "no_such_task_x" in unknown.output
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat"}\n')
    both = CliRunner().invoke(cli, [*home, "eval", "lora", "--data", str(data), "--lm-eval", GEN])
    neither = CliRunner().invoke(cli, [*home, "eval", "lora"])
    for result in (both, neither):
        assert result.exit_code == 2 and "--data FILE or --lm-eval TASKS" in result.output


@pytest.mark.slow
def test_eval_command_turns_a_refused_request_into_one_clear_error(registry):
    """A prompt over the base's positions, sent as text: the server's 400, said in one line."""
    args = [
        "--home", str(registry.home), "eval", "lora", "--lm-eval", "adaptory_reverse_long",
        "--include-path", str(TASKS), "--quant", "none", "--tokenizer", "none", "--limit", "2",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if "error:" in x]
    assert "error: the server refused lm-eval's request: " in line and "256" in line


@pytest.mark.slow
def test_nf4_lora_scores_equal_the_hf_backend_on_the_same_nf4_base(registry, tasks, tiny_llama_dir):
    """The default 4-bit serving: lm-eval's HF backend given the same NF4 base (Adaptory's
    loader, bitsandbytes), the adapter put on it by PeftModel.from_pretrained, on the fp32
    dequantize path that `--numerics fp32` serves with."""
    from lm_eval.models.huggingface import HFLM

    from adaptory.adapters.bases.loading import load_base

    with lmeval.served(registry, "lora", quant="nf4") as served:
        args = lmeval.model_args(served, batch_size=BATCH)
        got = run(tasks, [GEN, CHOICE], "local-completions", args)
    base = load_base(str(tiny_llama_dir), task="causal-lm", quant="nf4", dtype="float32")
    folder = registry.files(registry.resolve("lora"), verify=True)
    model = fp32_4bit_reference(PeftModel.from_pretrained(base.model, str(folder)).eval())
    hf = HFLM(pretrained=model, tokenizer=base.tokenizer, batch_size=BATCH)
    want = run(tasks, [GEN, CHOICE], hf, None)
    assert_same_generations(got[GEN], [s["filtered_resps"][0] for s in want[GEN]])
    assert_same_choices(got[CHOICE], want[CHOICE])
