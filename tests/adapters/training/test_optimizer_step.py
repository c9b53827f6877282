"""One optimizer step (`loop.optimizer_step`) against what plain torch computes on the same model.

The step runs on a real PEFT LoRA model over the tiny Llama with plain SGD (learning rate 1), so
a parameter's change is minus the gradient the step applied; the test computes the expected
gradients with its own forward and backward. Covers what the accumulation tests do not: a
micro-batch whose rows have no targets adds nothing, gradient clipping is applied when asked
(and only then), and the step reports its tokens and the learning rate it used.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adaptory.adapters.training.loop import loss_targets, optimizer_step

SEED = 7


@pytest.fixture
def lora_model(tiny_llama_dir):
    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(base, config)


def batch(rows: list[list[int]], first_target: list[int], pad: int = 0) -> dict:
    """A right-padded causal-LM batch; labels are -100 before each row's first target and on
    padding (a first target past the row's end leaves the row without targets)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, first) in enumerate(zip(rows, first_target, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, first : len(row)] = torch.tensor(row[first:], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_step(model, micro, *, clip_norm=None, lr_lambda=lambda step: 1.0):
    """One optimizer_step with SGD(lr=1); return (its result, each parameter's change)."""
    accelerator = Accelerator(cpu=True)
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    targets = [loss_targets(b, "causal-lm") for b in micro]
    clip = None if clip_norm is None else (params, clip_norm)
    result = optimizer_step(model, micro, targets, accelerator, optimizer, scheduler, clip)
    return (
        result,
        [p.detach() - b for p, b in zip(params, before, strict=True)],
        (optimizer, scheduler),
    )


def hand_gradient(model, micro) -> list[torch.Tensor]:
    """The gradient of the mean loss over every target of all micro-batches, from one backward
    of the summed per-token losses computed here."""
    params = trainable(model)
    for p in params:
        p.grad = None
    total, count = 0.0, 0
    for b in micro:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        targets = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        total, count = total + nll, count + int((targets != -100).sum())
    (total / count).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


ROWS = [[5, 9, 14, 3, 22, 7], [8, 2, 30, 11]]


def test_a_micro_batch_without_targets_adds_no_gradient_and_no_loss(lora_model):
    with_targets = batch(ROWS, [2, 1])
    without = batch([[12, 4, 19, 6, 2]], [99])  # every label -100: the model's mean is NaN
    assert loss_targets(without, "causal-lm") == 0
    expected = hand_gradient(lora_model, [with_targets])
    (loss, _tokens, _lr), changes, _ = run_step(lora_model, [with_targets, without])
    assert loss == pytest.approx(float(_mean_loss(lora_model, with_targets, changes)), rel=1e-5)
    for change, grad in zip(changes, expected, strict=True):
        torch.testing.assert_close(change, -grad, rtol=1e-4, atol=1e-6)


def _mean_loss(model, b, changes) -> torch.Tensor:
    """The loss of batch `b` at the weights before the step (undo the changes, measure, redo)."""
    params = trainable(model)
    with torch.no_grad():
        for p, c in zip(params, changes, strict=True):
            p.sub_(c)
        loss = model(**b).loss
        for p, c in zip(params, changes, strict=True):
            p.add_(c)
    return loss


def test_clipping_is_applied_when_asked_and_only_then(lora_model):
    micro = [batch(ROWS, [2, 1])]
    grads = hand_gradient(lora_model, micro)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    limit = float(norm) / 10
    assert limit > 0
    state = {k: v.clone() for k, v in lora_model.state_dict().items()}

    _, clipped, _ = run_step(lora_model, micro, clip_norm=limit)
    clipped_norm = torch.linalg.vector_norm(torch.stack([c.norm() for c in clipped]))
    assert float(clipped_norm) == pytest.approx(limit, rel=1e-3)
    for change, grad in zip(clipped, grads, strict=True):  # the same direction, scaled down
        torch.testing.assert_close(change, -grad * (limit / float(norm)), rtol=1e-3, atol=1e-7)

    lora_model.load_state_dict(state)
    _, free, _ = run_step(lora_model, micro, clip_norm=None)
    for change, grad in zip(free, grads, strict=True):
        torch.testing.assert_close(change, -grad, rtol=1e-4, atol=1e-6)


def test_the_step_reports_its_tokens_and_the_learning_rate_it_used(lora_model):
    micro = [batch(ROWS, [2, 1]), batch([[3, 3, 4]], [1])]
    halving = lambda step: 0.5**step  # noqa: E731
    (_, tokens, lr), _, (optimizer, scheduler) = run_step(lora_model, micro, lr_lambda=halving)
    assert tokens == len(ROWS[0]) + len(ROWS[1]) + 3  # real tokens, padding not counted
    assert lr == 1.0  # the rate of this step; the schedule has moved on for the next
    assert scheduler.get_last_lr()[0] == 0.5
    assert all(p.grad is None for p in trainable(lora_model))  # gradients cleared for the next
