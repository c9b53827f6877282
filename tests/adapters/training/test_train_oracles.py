"""The training data path and the training step checked against oracles the test computes itself.

Each expected number comes from outside Adaptory: token ids built here with the tokenizer from
the raw rows, losses summed here from a plain transformers forward of one unpadded row at a time,
gradients from a backward pass written here on a PEFT model given the same initial weights, and
held-out losses from a PEFT model loaded here from the saved adapter folder.

The loss of an optimizer step is the mean over all of its targets (completion tokens for
prompt/completion rows, every token after the first for text rows, rows for classification), so
N accumulated micro-batches equal one batch of the same rows, as docs/SCALING.md promises for
--grad-accum.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adaptory.adapters.training.data import collate, load_dataset
from adaptory.adapters.training.loop import TrainConfig, train_adapter
from adaptory.registry import Registry

# Four rows of different lengths (so a batch of them is padded), in both causal-LM formats.
PC_ROWS = [
    {"prompt": "Shout: the cat sat\nAnswer:", "completion": " THE CAT SAT"},
    {"prompt": "Shout: red ball\nAnswer:", "completion": " RED BALL"},
    {"prompt": "Shout: the dog ran to the park\nAnswer:", "completion": " THE DOG RAN TO THE PARK"},
    {"prompt": "Reverse: red green blue\nAnswer:", "completion": " blue green red"},
]
TEXT_ROWS = [
    {"text": "the cat sat on the mat."},
    {"text": "a red ball and a blue box."},
    {"text": "the shop sells books, lamps, shoes and tea. the dog ran to the park."},
    {"text": "great product"},
]
# Five rows: micro-batches of two leave a last micro-batch of one, so a mean of per-micro-batch
# means would weigh that row twice as much as the others.
CLS_ROWS = [
    {"text": "great product, would buy again", "label": "pos"},
    {"text": "terrible quality, it broke after a week", "label": "neg"},
    {"text": "the battery lasts all day and the screen is bright", "label": "pos"},
    {"text": "the refund took too long", "label": "neg"},
    {"text": "my order arrived late and the box was broken", "label": "neg"},
]
WORDS = "the cat sat on a mat dog ran to park red ball blue box shop sells books tea".split()


@pytest.fixture
def registry(adaptory_home) -> Registry:
    return Registry(adaptory_home)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hand_ids(tokenizer, row: dict) -> tuple[list[int], int]:
    """A causal-LM row's token ids built from its raw strings, and the index of its first target:
    prompt (with the tokenizer's special tokens) + completion + eos, targets = the completion and
    eos; or text + eos, targets = every token after the first (nothing predicts the first)."""
    eos = tokenizer.eos_token_id
    if "text" in row:
        return list(tokenizer(row["text"])["input_ids"]) + [eos], 1
    prompt = list(tokenizer(row["prompt"])["input_ids"])
    completion = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
    return prompt + completion + [eos], len(prompt)


def row_nll(model, ids: list[int], first: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of ids[first:], each given the tokens before it, from one
    forward pass over the unpadded row; and how many tokens that sums over."""
    x = torch.tensor([ids], device=model.device)
    logits = model(input_ids=x).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    return nll[first - 1 :].sum().cpu(), len(ids) - first


def mean_nll(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """The per-token mean loss over every target of `rows`."""
    total, count = torch.zeros(()), 0
    for row in rows:
        nll, n = row_nll(model, *hand_ids(tokenizer, row))
        total, count = total + nll, count + n
    return total / count


def mean_cls_loss(model, tokenizer, rows: list[dict], labels: list[str]) -> torch.Tensor:
    """The per-row mean cross-entropy of a classifier, one unpadded row at a time."""
    losses = []
    for row in rows:
        enc = tokenizer(row["text"], return_tensors="pt").to(model.device)
        logits = model(**enc).logits.float()
        target = torch.tensor([labels.index(row["label"])], device=logits.device)
        losses.append(torch.nn.functional.cross_entropy(logits, target))
    return torch.stack(losses).mean()


@contextlib.contextmanager
def first_optimizer_step():
    """Record the trainable parameters and their gradients as the first AdamW step of the run
    begins (torch's global step hook observes; the real optimizer then runs unchanged)."""
    seen: dict = {}

    def hook(optimizer, args, kwargs):
        if "params" not in seen and isinstance(optimizer, torch.optim.AdamW):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            seen["params"] = [p.detach().clone() for p in params]
            seen["grads"] = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params
            ]

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def nf4_rounded(model) -> None:
    """Replace every quantized Linear's weight (all but lm_head) by its NF4 round trip, done with
    bitsandbytes directly: the weights a 4-bit base computes with."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                q, state = bnbf.quantize_4bit(
                    module.weight.data, quant_type="nf4", compress_statistics=True
                )
                module.weight.copy_(bnbf.dequantize_4bit(q, state))


def reference_model(base_dir: Path, adapter_dir: Path, task: str, *, labels=None, nf4=False):
    """A PEFT model built here on the unquantized base (NF4-rounded if `nf4`) with the stored
    adapter's config."""
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=len(labels), dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if nf4:
        nf4_rounded(model)
    return get_peft_model(model, config)


def load_trainables(model, values: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Copy `values` (in the optimizer's order, which is model.parameters() order) into the
    model's trainable parameters; return those parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [tuple(v.shape) for v in values]
    with torch.no_grad():
        for p, v in zip(trainable, values, strict=True):
            p.copy_(v)
    return trainable


def step_config(base: Path, data: Path, name: str, **kw) -> TrainConfig:
    """One optimizer step over every row with nothing random in the forward pass; the gradient
    clip runs but never rescales."""
    defaults = {
        "max_steps": 1,
        "eval_split": 0,
        "dropout": 0.0,
        "quant": "none",
        "max_grad_norm": 1e6,
        "max_length": 64,
        "seed": 0,
    }
    return TrainConfig(base=str(base), data=str(data), name=name, **{**defaults, **kw})


# --- data: the collated batch -------------------------------------------------------------------


@pytest.mark.parametrize("rows", [PC_ROWS, TEXT_ROWS], ids=["prompt-completion", "text"])
def test_collated_batch_matches_hand_built_inputs_and_loss(tiny_llama_dir, tmp_path, rows):
    """Adaptory's tokenized, right-padded batch equals the one built here from the raw rows
    (labels -100 on prompt and padding), and transformers' loss on it equals the per-token mean
    over each unpadded row's targets."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    dataset = load_dataset(
        write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tokenizer, task="causal-lm"
    )
    batch = collate(dataset.examples, pad_id=tokenizer.pad_token_id, task="causal-lm")

    built = [hand_ids(tokenizer, row) for row in rows]
    width = max(len(ids) for ids, _ in built)
    assert len({len(ids) for ids, _ in built}) > 1  # the batch really is padded
    pad = tokenizer.pad_token_id
    want_ids = [ids + [pad] * (width - len(ids)) for ids, _ in built]
    want_mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in built]
    want_labels = [
        [-100] * first + ids[first:] + [-100] * (width - len(ids)) for ids, first in built
    ]
    if "text" in rows[0]:  # a text row's first token is a label too; no position predicts it
        want_labels = [[ids[0]] + lab[1:] for (ids, _), lab in zip(built, want_labels, strict=True)]
    assert batch["input_ids"].tolist() == want_ids
    assert batch["attention_mask"].tolist() == want_mask
    assert batch["labels"].tolist() == want_labels

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(**batch).loss
        want = mean_nll(model, tokenizer, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- the training step --------------------------------------------------------------------------


STEP_CASES = [
    ("prompt-completion", 4, 1, "none"),
    ("prompt-completion", 2, 2, "none"),
    ("prompt-completion", 1, 4, "none"),
    ("text", 2, 2, "none"),
    ("prompt-completion", 2, 2, "nf4"),
]


@pytest.mark.parametrize(
    "fmt,batch_size,grad_accum,quant",
    STEP_CASES,
    ids=[f"{c[0]}-bs{c[1]}x{c[2]}-{c[3]}" for c in STEP_CASES],
)
def test_first_step_gradient_equals_a_hand_written_step(
    registry, tiny_llama_dir, tmp_path, fmt, batch_size, grad_accum, quant
):
    """One optimizer step over all four rows, split into micro-batches or not: the gradient the
    optimizer receives and the logged loss equal a backward pass written here on the same initial
    LoRA weights, with the per-token mean over every target of the step (so accumulation equals
    one large batch)."""
    rows = PC_ROWS if fmt == "prompt-completion" else TEXT_ROWS
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with first_optimizer_step() as seen:
        result = train_adapter(
            step_config(
                tiny_llama_dir,
                data,
                "step",
                batch_size=batch_size,
                grad_accum=grad_accum,
                quant=quant,
            ),
            registry=registry,
            show_progress=False,
        )
    assert "grads" in seen, "the optimizer never stepped"

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = reference_model(
        tiny_llama_dir, registry.files(result.entry.ref), "causal-lm", nf4=quant == "nf4"
    )
    trainable = load_trainables(model, seen["params"])
    model.eval()  # no dropout anywhere; gradients still flow
    loss = mean_nll(model, tokenizer, rows)
    loss.backward()

    assert max(float(p.grad.abs().max()) for p in trainable) > 0
    for got, p in zip(seen["grads"], trainable, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    logged = [h["loss"] for h in result.loss_history if "loss" in h]
    assert logged == [pytest.approx(float(loss), abs=1e-5)]


@pytest.mark.parametrize("batch_size,grad_accum", [(5, 1), (2, 3)], ids=["bs5x1", "bs2x3"])
def test_classification_step_gradient_is_the_mean_over_rows(
    registry, tiny_llama_dir, tmp_path, batch_size, grad_accum
):
    """A classification step over five rows, whole or as micro-batches of 2, 2 and 1: the
    gradient equals that of the per-row mean cross-entropy computed here (head included)."""
    data = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    with first_optimizer_step() as seen:
        result = train_adapter(
            step_config(tiny_llama_dir, data, "cls", batch_size=batch_size, grad_accum=grad_accum),
            registry=registry,
            show_progress=False,
        )
    assert "grads" in seen, "the optimizer never stepped"

    labels = sorted({row["label"] for row in CLS_ROWS})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = reference_model(
        tiny_llama_dir, registry.files(result.entry.ref), "seq-cls", labels=labels
    )
    trainable = load_trainables(model, seen["params"])
    model.eval()
    loss = mean_cls_loss(model, tokenizer, CLS_ROWS, labels)
    loss.backward()

    assert max(float(p.grad.abs().max()) for p in trainable) > 0
    for got, p in zip(seen["grads"], trainable, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)
    logged = [h["loss"] for h in result.loss_history if "loss" in h]
    assert logged == [pytest.approx(float(loss), abs=1e-5)]


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_accumulated_micro_batches_equal_one_batch_for_every_method(
    registry, tiny_llama_dir, tmp_path, method
):
    """For the other adapter kinds (prompt tuning counts one more target per row: the first
    token, predicted from the virtual tokens), a step over four text rows as one batch, as 2×2
    and as 4×1 micro-batches starts from the same weights and hands the optimizer the same
    gradient."""
    data = write_jsonl(tmp_path / "d.jsonl", TEXT_ROWS)
    runs = []
    for batch_size, grad_accum in [(4, 1), (2, 2), (1, 4)]:
        with first_optimizer_step() as seen:
            train_adapter(
                step_config(
                    tiny_llama_dir,
                    data,
                    f"{method}-{batch_size}",
                    method=method,
                    batch_size=batch_size,
                    grad_accum=grad_accum,
                ),
                registry=registry,
                show_progress=False,
            )
        assert "grads" in seen, "the optimizer never stepped"
        runs.append(seen)
    whole = runs[0]
    assert max(float(g.abs().max()) for g in whole["grads"]) > 0
    for run in runs[1:]:
        for a, b in zip(whole["params"], run["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(whole["grads"], run["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --- training lowers a held-out loss ------------------------------------------------------------


def fixed_reply_rows(n: int, seed: int) -> list[dict]:
    """A toy task an untrained base can learn in a few dozen steps: varied prompts, one reply."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append(
            {"prompt": f"Shout: {words}\nAnswer:", "completion": " the cat sat on the mat."}
        )
    return rows


def nf4_base(base_dir: Path):
    """The base in 4-bit NF4 with double quantization, loaded here by transformers."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    )
    return AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=config, device_map={"": "cpu"}
    ).eval()


def test_training_lowers_the_held_out_loss(registry, tiny_llama_dir, tmp_path):
    """A seeded 40-step LoRA run on the 4-bit base lowers the loss on held-out rows, measured
    here with the adapter loaded from its stored folder, by at least 0.5 nats below the base. A
    run whose optimizer never stepped would leave LoRA B at zero: exactly the base's loss."""
    seed = 0
    print(f"data seeds {seed} (train) and {seed + 1} (held out), training seed {seed}")
    train = write_jsonl(tmp_path / "train.jsonl", fixed_reply_rows(32, seed))
    held_rows = fixed_reply_rows(8, seed + 1)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    result = train_adapter(
        TrainConfig(
            base=str(tiny_llama_dir),
            data=str(train),
            eval_data=str(held),
            name="fixed-reply",
            max_steps=40,
            batch_size=8,
            lr=1e-2,
            seed=seed,
        ),
        registry=registry,
        show_progress=False,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    with torch.no_grad():
        base = nf4_base(tiny_llama_dir)
        base_loss = float(mean_nll(base, tokenizer, held_rows))
        model = PeftModel.from_pretrained(base, str(registry.files(result.entry.ref))).eval()
        adapter_loss = float(mean_nll(model, tokenizer, held_rows))
    print(f"held-out loss: base {base_loss:.4f}, adapter {adapter_loss:.4f}")
    assert adapter_loss < base_loss - 0.5
    # the eval numbers recorded with the entry are the ones measured here
    assert result.metrics["eval_loss"] == pytest.approx(adapter_loss, abs=1e-3)
    assert result.metrics["base"]["eval_loss"] == pytest.approx(base_loss, abs=1e-3)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_the_stored_adapter_is_the_best_evaluated_one_unless_asked_for_the_last(
    registry, tiny_llama_dir, tmp_path, keep
):
    """A run made to overshoot (learning rate 1.0, constant) evaluates after every step. By
    default the entry stores the adapter of the step with the lowest eval loss; `keep="last"`
    stores the last one. The held-out loss is measured here on the stored folder."""
    train = write_jsonl(tmp_path / "train.jsonl", fixed_reply_rows(16, 0))
    held_rows = fixed_reply_rows(8, 1)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    result = train_adapter(
        TrainConfig(base=str(tiny_llama_dir), data=str(train), eval_data=str(held),
                    name=f"overshoot-{keep}", max_steps=12, batch_size=8, lr=1.0, seed=0,
                    eval_every=1, schedule="constant", warmup=0, keep=keep),
        registry=registry, show_progress=False,
    )  # fmt: skip
    evals = [(p["step"], p["eval_loss"]) for p in result.loss_history if "eval_loss" in p]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    last_step, last_loss = evals[-1]
    print(f"eval losses by step: {evals}")
    assert best_step < last_step and best_loss < last_loss - 0.05, "the run did not overshoot"

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    with torch.no_grad():
        model = PeftModel.from_pretrained(
            nf4_base(tiny_llama_dir), str(registry.files(result.entry.ref))
        ).eval()
        stored_loss = float(mean_nll(model, tokenizer, held_rows))
    kept = result.entry.extra["kept"]
    if keep == "best":
        assert stored_loss == pytest.approx(best_loss, abs=1e-3)
        assert kept == {"which": "best", "step": best_step, "eval_loss": best_loss}
    else:
        assert stored_loss == pytest.approx(last_loss, abs=1e-3)
        assert kept == {"which": "last", "step": last_step}
    assert result.metrics["eval_loss"] == pytest.approx(stored_loss, abs=1e-3)
    assert result.entry.training_config["keep"] == keep
