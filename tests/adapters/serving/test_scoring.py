"""Scoring and sampling controls in the decode batch, on the real 4-bit tiny Llama with LoRA,
prefix and base rows mixed in one batch. Oracles: each adapter alone under PEFT (its forward's
log-softmax), transformers' own logits processors, and hand-written penalty formulas."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import _reference_model, make_lora, make_prefix, register
from transformers import RepetitionPenaltyLogitsProcessor

from adaptory.adapters.bases.numerics import TOLERANCES
from adaptory.adapters.serving.decode import DecodeBatch, GenerationRequest
from adaptory.adapters.serving.runtime import Runtime
from adaptory.adapters.serving.sampling import Controls
from adaptory.registry import Registry

PROMPTS = ["the cat sat on the mat", "a red ball and a blue box", "my order never came"]
ATOL = TOLERANCES["float32"].logits_atol


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("scoring")
    reg = Registry(root / "home")
    folders = {
        "lora-a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "pfx": make_prefix(tiny_llama_dir, root / "p", seed=3, virtual_tokens=4),
    }
    for name, folder in folders.items():
        register(reg, folder, name, tiny_llama_dir)
    folders[None] = None
    return folders, Runtime(str(tiny_llama_dir), registry=reg, max_adapters=4)


def reference_logprobs(base_dir, folder, ids: list[int]) -> torch.Tensor:
    """log-softmax of the adapter's own PEFT forward over `ids` (positions × vocabulary)."""
    model = _reference_model(str(base_dir), str(folder) if folder else None)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def run(runtime, requests: list[GenerationRequest]):
    batch = DecodeBatch(runtime, keep_logits=True, slots=4, length=64)
    rows = batch.add_many([(r, None) for r in requests])
    while batch.active:
        batch.step()
    for row in rows:
        assert row.error is None, row.error
    return rows


def test_prompt_logprobs_of_mixed_rows_equal_each_adapter_alone(causal, tiny_llama_dir):
    """echo scoring (max_tokens 0): LoRA, prefix and base rows in one prefill; every prompt
    token's logprob and top-3 equal the adapter's own PEFT forward; nothing is generated."""
    folders, runtime = causal
    adapters = ["lora-a", "pfx", None]
    rows = run(
        runtime,
        [
            GenerationRequest(prompt=p, adapter=a, max_new_tokens=0, prompt_logprobs=3)
            for p, a in zip(PROMPTS, adapters, strict=True)
        ],
    )
    for row, adapter in zip(rows, adapters, strict=True):
        result = row.result
        assert (result.finish_reason, result.completion_tokens, result.text) == ("length", 0, "")
        ids = result.prompt_ids
        ref = reference_logprobs(tiny_llama_dir, folders[adapter], ids)
        entries = result.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            expected = ref[position - 1]
            assert entry.token == ids[position]
            assert abs(entry.logprob - float(expected[ids[position]])) <= ATOL, (adapter, position)
            top_ids = [t for t, _ in entry.top]
            assert len(top_ids) == 3
            assert abs(entry.top[0][1] - float(expected.max())) <= ATOL
            for token, logprob in entry.top:
                assert abs(logprob - float(expected[token])) <= ATOL


def test_generated_logprobs_equal_the_reference_at_every_step(causal, tiny_llama_dir):
    """Greedy with logprobs=2: the chosen token is the reference's best, its logprob the
    reference's, and the cumulative logprob their sum."""
    folders, runtime = causal
    adapters = ["lora-a", "pfx", None]
    rows = run(
        runtime,
        [
            GenerationRequest(prompt=p, adapter=a, max_new_tokens=5, logprobs=2)
            for p, a in zip(PROMPTS, adapters, strict=True)
        ],
    )
    for row, adapter in zip(rows, adapters, strict=True):
        result = row.result
        ids = list(result.prompt_ids)
        assert len(result.logprobs) == result.completion_tokens > 0
        total = 0.0
        for entry in result.logprobs:
            expected = reference_logprobs(tiny_llama_dir, folders[adapter], ids)[-1]
            assert entry.token == int(expected.argmax()), adapter
            assert abs(entry.logprob - float(expected[entry.token])) <= ATOL
            assert entry.top[0][0] == entry.token and len(entry.top) == 2
            total += float(expected[entry.token])
            ids.append(entry.token)
        assert abs(result.cumulative_logprob - total) <= ATOL * len(result.logprobs)


def test_logprobs_are_off_unless_asked_for(causal):
    _, runtime = causal
    (row,) = run(runtime, [GenerationRequest(prompt=PROMPTS[0], max_new_tokens=3)])
    assert row.result.logprobs is None and row.result.prompt_logprobs is None


# --- sampling controls --------------------------------------------------------------------------


def greedy_with(runtime, adapter=None, **controls):
    request = GenerationRequest(
        prompt=PROMPTS[0], adapter=adapter, max_new_tokens=6, logprobs=0, **controls
    )
    return run(runtime, [request])[0].result


def eos_of(runtime) -> int:
    return int(runtime.tokenizer.eos_token_id)


def test_logit_bias_forces_a_token(causal):
    _, runtime = causal
    forced = runtime.encode("ball", chat=True)[0]
    result = greedy_with(runtime, "lora-a", logit_bias={forced: 100.0})
    assert result.token_ids == [forced] * 6 and result.finish_reason == "length"


def test_min_tokens_holds_back_the_end_then_lets_it_through(causal):
    """EOS biased to be certain: without min_tokens the row ends at once; with min_tokens 3 it
    samples three other tokens first, then ends on EOS."""
    _, runtime = causal
    eos = eos_of(runtime)
    at_once = greedy_with(runtime, logit_bias={eos: 100.0})
    assert (at_once.completion_tokens, at_once.finish_reason) == (1, "stop")
    held = greedy_with(runtime, logit_bias={eos: 100.0}, min_tokens=3)
    assert (held.completion_tokens, held.finish_reason) == (4, "stop")
    assert eos not in held.token_ids and len(held.token_ids) == 3


def test_ignore_eos_runs_to_max_tokens(causal):
    _, runtime = causal
    eos = eos_of(runtime)
    result = greedy_with(runtime, logit_bias={eos: 100.0}, ignore_eos=True)
    assert (result.completion_tokens, result.finish_reason) == (6, "length")
    assert result.token_ids == [eos] * 6


def test_stop_token_ids_end_the_row_without_their_text(causal):
    _, runtime = causal
    forced = runtime.encode("ball", chat=True)[0]
    # a presence penalty makes every token new: stopping on the third keeps the first two
    free = greedy_with(runtime, "lora-a", presence_penalty=2.0)
    assert len(set(free.token_ids)) == len(free.token_ids) == 6
    stopped = greedy_with(
        runtime, "lora-a", presence_penalty=2.0, stop_token_ids=[free.token_ids[2]]
    )
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:2]
    assert stopped.completion_tokens == 3
    biased = greedy_with(runtime, logit_bias={forced: 100.0}, stop_token_ids=[forced])
    assert (biased.text, biased.completion_tokens, biased.finish_reason) == ("", 1, "stop")


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_equals_transformers_processor(causal, tiny_llama_dir, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL's rule over prompt and output) on
    the reference's raw logits is the oracle."""
    _, runtime = causal
    result = greedy_with(runtime, repetition_penalty=penalty)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    ids = result.prompt_ids
    raw_expected = []
    for _ in range(6):
        model = _reference_model(str(tiny_llama_dir), None)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + raw_expected])).logits[0, -1].float()
        seen = torch.tensor([ids + raw_expected])
        raw_expected.append(int(processor(seen, logits[None].clone())[0].argmax()))
    assert [e.token for e in result.logprobs] == raw_expected[: result.completion_tokens]


def test_presence_and_frequency_penalties_follow_openais_formula(causal, tiny_llama_dir):
    """OpenAI's documented rule: logit − count·frequency − (count > 0)·presence, over the
    generated tokens only (here large enough to forbid any repeat)."""
    _, runtime = causal
    result = greedy_with(runtime, frequency_penalty=2.0, presence_penalty=2.0)
    ids = result.prompt_ids
    expected: list[int] = []
    model = _reference_model(str(tiny_llama_dir), None)
    for _ in range(result.completion_tokens):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + expected])).logits[0, -1].float()
        logits = logits.clone()  # out of inference mode: editable
        for token in set(expected):
            count = expected.count(token)
            logits[token] -= 2.0 * count + 2.0
        expected.append(int(logits.argmax()))
    assert [e.token for e in result.logprobs] == expected


def test_controls_leave_reported_logprobs_raw(causal, tiny_llama_dir):
    """A biased token is chosen, but its reported logprob is the model's own (vLLM's
    raw_logprobs default), not the biased one."""
    _, runtime = causal
    forced = runtime.encode("ball", chat=True)[0]
    result = greedy_with(runtime, logit_bias={forced: 100.0})
    expected = reference_logprobs(tiny_llama_dir, None, result.prompt_ids)[-1]
    assert abs(result.logprobs[0].logprob - float(expected[forced])) <= ATOL
    assert result.logprobs[0].logprob < -0.5  # not ~0, as a +100 bias would make it


def test_top_k_one_and_min_p_one_are_greedy_at_any_temperature(causal):
    _, runtime = causal
    greedy = greedy_with(runtime, "lora-a")
    for controls in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = greedy_with(runtime, "lora-a", temperature=1.5, seed=7, **controls)
        assert sampled.token_ids == greedy.token_ids, controls


def test_controls_off_by_default_change_nothing():
    logits = torch.randn(50)
    assert not Controls().active
    out = Controls().apply(logits, prompt=[1, 2], generated=[3], ends={0})
    assert torch.equal(out, logits)
