"""The decode path on the real 4-bit tiny Llama: a static per-row KV cache, rows moving between
slots, bucketed steps (as CUDA graphs replay them), compiled steps, numerics modes, batch
sizing and incremental detokenization — every output checked against each adapter run alone
under PEFT, or against the eager path."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from serving_helpers import make_lora, make_prefix, reference_greedy, register

from adaptory.adapters.bases.numerics import TOLERANCES, resolve_numerics
from adaptory.adapters.serving.decode import DecodeBatch, GenerationRequest
from adaptory.adapters.serving.detokenize import IncrementalText
from adaptory.adapters.serving.graphs import GraphedSteps
from adaptory.adapters.serving.kv_cache import KVShape, RowKVCache, bucket
from adaptory.adapters.serving.runtime import MAX_AUTO_BATCH, Runtime
from adaptory.registry import Registry
from adaptory.registry.errors import ConfigError

PROMPTS = ["the cat sat", "a red ball and a blue box", "my order", "the dog ran to the park. the"]


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("decode")
    reg = Registry(root / "home")
    folders = {
        "lora-a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "lora-b": make_lora(tiny_llama_dir, root / "b", seed=2, targets=("q_proj", "down_proj")),
        "pfx": make_prefix(tiny_llama_dir, root / "p", seed=3, virtual_tokens=4),
    }
    for name, folder in folders.items():
        register(reg, folder, name, tiny_llama_dir)
    folders[None] = None
    return reg, folders, Runtime(str(tiny_llama_dir), registry=reg, max_adapters=8)


def requests(*specs) -> list[tuple[GenerationRequest, None]]:
    return [
        (GenerationRequest(prompt=PROMPTS[p], adapter=a, max_new_tokens=n), None)
        for a, p, n in specs
    ]


def assert_alone(base_dir, folders, rows) -> None:
    """Each row's tokens equal its adapter alone under PEFT, its logits within tolerance."""
    atol = TOLERANCES["float32"].logits_atol
    for row in rows:
        ref_logits: list = []
        expected = reference_greedy(
            base_dir, folders[row.request.adapter], row.prompt_ids, row.request.max_new_tokens,
            logits=ref_logits,
        )  # fmt: skip
        assert row.result is not None, (row.request, row.error)
        assert row.result.token_ids == expected, row.request
        for mine, theirs in zip(row.logits, ref_logits, strict=False):
            assert (mine - theirs).abs().max() <= atol, row.request


# --- the cache ---------------------------------------------------------------------------------


def test_rows_own_their_slots_and_moves_keep_them_exact(causal, tiny_llama_dir):
    """The first row finishes first; the last row takes its slot (a copy of its K/V) and goes on
    decoding there; everyone still equals their adapter alone."""
    _, folders, runtime = causal
    batch = DecodeBatch(runtime, keep_logits=True, slots=2, length=32)
    rows = batch.add_many(requests(("lora-a", 0, 2), ("pfx", 1, 9), (None, 2, 7), ("lora-b", 3, 8)))
    assert batch.cache.slots >= 4  # grew past its two slots
    batch.step()
    batch.step()  # the lora-a row (slot 0) has finished
    assert batch.active == 3 and batch.rows[0] is rows[3]  # the last row moved into slot 0
    while batch.active:
        batch.step()
    assert_alone(tiny_llama_dir, folders, rows)


def test_a_released_slot_is_zeroed(causal):
    """Masked positions must hold zeros: NaN there would reach the next row through the mask."""
    _, _, runtime = causal
    batch = DecodeBatch(runtime, slots=4, length=64)
    batch.add_many(requests(("pfx", 3, 3), ("lora-a", 0, 6)))
    assert batch.written[0] > 0
    for layer in batch.cache.keys:
        layer[0, :, batch.written[0] : batch.written[0] + 5] = float("nan")  # beyond what it wrote
    batch.written[0] += 5
    while batch.active:
        batch.step()
    for keys, values in zip(batch.cache.keys, batch.cache.values, strict=True):
        assert not keys[:2].any() and not values[:2].any()


def test_cache_moves_clear_and_growth():
    shape = KVShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)
    cache = RowKVCache(shape, slots=2, length=8, device="cpu")
    for layer in range(2):
        cache.keys[layer][1, :, :5] = torch.arange(5.0)[:, None]
    cache.move(1, 0, 5)
    assert torch.equal(cache.keys[1][0, :, :5], cache.keys[1][1, :, :5])
    cache.clear(1, 0, 5)
    assert not cache.keys[0][1].any()
    version = cache.version
    cache.grow(slots=4, length=16, keep_rows=1, keep_length=5)
    assert (cache.slots, cache.length, cache.version) == (4, 16, version + 1)
    assert torch.equal(cache.keys[1][0, :, :5], torch.arange(5.0)[:, None].expand(2, 5, 4))
    assert shape.bytes_per_token == 2 * 2 * 2 * 4 * 4
    assert [bucket(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    assert bucket(40, smallest=32, largest=48) == 48


# --- how steps run ------------------------------------------------------------------------------


class ReplayedSteps(GraphedSteps):
    """GraphedSteps with CUDA capture replaced by a stand-in (no CPU runs CUDA graphs): its
    replay recomputes the static step from the batch's buffers as they are at replay time, which
    is what replaying a captured graph does. Everything else — buckets, inactive slots,
    recapture when buffers move, the eager fallback — is GraphedSteps' own code."""

    def _capture(self, size, view):
        batch = self.batch
        with torch.no_grad():
            out = batch.decode_step(size, view, static=True)

        class Replay:
            def replay(self_inner):
                with torch.no_grad():
                    out.copy_(batch.decode_step(size, view, static=True))

        self.captures += 1
        return Replay(), out


def test_bucketed_static_steps_equal_the_adapters_alone(causal, tiny_llama_dir):
    """Padded buckets (3 rows in a bucket of 4, views rounded up), the bank's general path for
    every row, and replays that read buffers changed since capture: the same outputs."""
    _, folders, runtime = causal
    batch = DecodeBatch(runtime, keep_logits=True, slots=8, length=64)
    batch.runner = runner = ReplayedSteps(batch)
    rows = batch.add_many(requests(("lora-a", 1, 7), ("pfx", 0, 9), (None, 2, 3)))
    batch.step()
    rows += batch.add_many(requests(("lora-b", 3, 6)))  # joins mid-decode: same graphs
    while batch.active:
        batch.step()
    assert_alone(tiny_llama_dir, folders, rows)
    assert 0 < runner.captures < batch.steps  # graphs were replayed, not recaptured per step


def test_graphs_are_recaptured_when_their_buffers_move(causal):
    _, _, runtime = causal
    batch = DecodeBatch(runtime, slots=1, length=32)
    batch.runner = runner = ReplayedSteps(batch)
    batch.add_many(requests(("lora-a", 0, 4)))
    batch.step()
    before = runner.captures
    batch.add_many(requests(("lora-b", 1, 4), ("pfx", 2, 4)))  # grows: new buffers
    while batch.active:
        batch.step()
    assert runner.captures > before and runner.captured_for[0] == batch.cache.version


def test_a_failed_capture_falls_back_to_eager_and_says_so_once(causal, tiny_llama_dir, caplog):
    _, folders, runtime = causal

    class Refused(GraphedSteps):
        def _capture(self, size, view):
            raise RuntimeError("operation not permitted when stream is capturing")

    batch = DecodeBatch(runtime, keep_logits=True, slots=4, length=64)
    batch.runner = Refused(batch)
    with caplog.at_level(logging.WARNING, logger="adaptory.serving"):
        rows = batch.add_many(requests(("lora-a", 0, 5), ("pfx", 3, 5)))
        while batch.active:
            batch.step()
    assert_alone(tiny_llama_dir, folders, rows)
    warnings = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "decoding eagerly" in warnings[0].getMessage()


def test_cuda_graphs_need_cuda_and_modes_are_checked(causal):
    _, _, runtime = causal
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            DecodeBatch(runtime, mode="cuda-graphs")
    with pytest.raises(ConfigError, match="unknown decode mode"):
        DecodeBatch(runtime, mode="turbo")
    assert DecodeBatch(runtime).runner.name == (
        "cuda-graphs" if torch.cuda.is_available() else "eager"
    )


@pytest.mark.slow
def test_the_decode_step_compiles_as_one_graph(causal, tiny_llama_dir):
    """torch.compile(fullgraph=True) fails on any graph break: the step has no host sync and no
    data-dependent Python branch — what CUDA graph capture needs — with LoRA, prefix and base
    rows, and its outputs equal the adapters alone."""
    _, folders, runtime = causal
    batch = DecodeBatch(runtime, keep_logits=True, slots=4, length=64, mode="compile")
    rows = batch.add_many(requests(("lora-a", 1, 6), ("pfx", 0, 6), (None, 2, 6)))
    while batch.active:
        batch.step()
    assert batch.runner.name == "compile"
    assert_alone(tiny_llama_dir, folders, rows)


# --- numerics and sizing ------------------------------------------------------------------------


def test_numerics_modes_resolve_per_device():
    assert resolve_numerics("auto", "cpu").dtype_name == "float32"
    assert resolve_numerics("bf16", "cpu").dtype_name == "bfloat16"
    with pytest.raises(ConfigError, match="unknown numerics"):
        resolve_numerics("fp8", "cpu")


def test_bf16_logits_stay_within_the_stated_tolerance(causal, tiny_llama_dir):
    reg, _, fp32 = causal
    bf16 = Runtime(str(tiny_llama_dir), registry=reg, numerics="bf16")
    assert bf16.model.get_input_embeddings().weight.dtype == torch.bfloat16
    got: dict = {}
    for name, rt in (("fp32", fp32), ("bf16", bf16)):
        batch = DecodeBatch(rt, keep_logits=True, slots=4, length=64)
        rows = batch.add_many(
            [
                (GenerationRequest(prompt=p, adapter="lora-a", max_new_tokens=1), None)
                for p in PROMPTS
            ]
        )
        got[name] = torch.stack([r.logits[0] for r in rows])
    drift = float((got["bf16"] - got["fp32"]).abs().max())
    assert 0 < drift <= TOLERANCES["bfloat16"].logits_atol, drift


def test_the_automatic_batch_limit_follows_the_kv_budget(causal):
    _, _, runtime = causal
    shape = KVShape.of(runtime.model.config, runtime.model.get_input_embeddings().weight.dtype)
    per_row = shape.bytes_per_token * 256
    assert runtime.max_batch(256, budget_bytes=10 * per_row + 1) == 10
    assert runtime.max_batch(256, budget_bytes=1) == 1
    assert runtime.max_batch(256, budget_bytes=10**15) == MAX_AUTO_BATCH


def test_generate_prefills_every_request_in_one_forward(causal):
    _, _, runtime = causal
    calls = []
    hook = runtime.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        runtime.generate(
            [GenerationRequest(prompt=p, adapter=a, max_new_tokens=2) for p, a in
             zip(PROMPTS, ("lora-a", "pfx", None, "lora-b"), strict=True)]
        )  # fmt: skip
    finally:
        hook.remove()
    assert calls[0][0] == 4 and calls[0][1] > 1  # one prefill of all four prompts
    assert all(shape[1] == 1 for shape in calls[1:])  # then one token per row per step


# --- text -----------------------------------------------------------------------------------


def _metaspace_tokenizer(corpus):
    """A SentencePiece-style tokenizer (words marked by ▁), trained here: decoding a slice drops
    the space of its first word, which incremental decoding must not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_incremental_text_equals_decoding_everything(causal, test_corpus):
    _, _, runtime = causal
    rng = random.Random(11)
    print("seed 11")
    for tokenizer in (runtime.tokenizer, _metaspace_tokenizer(test_corpus)):
        size = len(tokenizer)
        for _ in range(200):
            ids = [rng.randrange(size) for _ in range(rng.randint(1, 30))]
            text = IncrementalText(tokenizer)
            pieces = [text.add(t) for t in ids] + [text.finish()]
            assert "".join(pieces) == text.text == tokenizer.decode(ids, skip_special_tokens=True)


# --- the LoRA bank's grouped path ---------------------------------------------------------------


def test_group_rows_sorts_rows_by_slot_with_end_offsets():
    from adaptory.adapters.serving.lora_bank import group_rows

    order, inverse, ends = group_rows([2, 0, 2, 1, 0], capacity=4)
    assert [[2, 0, 2, 1, 0][i] for i in order] == [0, 0, 1, 2, 2]
    assert [order[i] for i in inverse] == list(range(5))
    assert ends == [2, 3, 5, 5]


def test_grouped_decode_steps_equal_the_adapters_alone(causal, tiny_llama_dir, monkeypatch):
    """The grouped path (two grouped GEMMs over rows sorted by bank slot; on by default on CUDA
    after a self-check) forced on here, through bucketed replays: rows join and leave, so the
    sort order and offsets are refreshed between steps; every output equals its adapter alone."""
    from adaptory.adapters.serving import lora_bank
    from adaptory.adapters.serving.lora_bank import grouped_self_check

    monkeypatch.setenv("ADAPTORY_GROUPED_LORA", "force")
    grouped_calls = []  # (x's shape, the stack) of each call: the self-check's are not the bank's
    real = lora_bank._grouped_delta

    def counted(x, output, stack, *groups):
        grouped_calls.append((x.shape, stack))
        return real(x, output, stack, *groups)

    monkeypatch.setattr(lora_bank, "_grouped_delta", counted)
    _, folders, runtime = causal
    assert grouped_self_check(torch.device("cpu"), torch.float32, 4)
    batch = DecodeBatch(runtime, keep_logits=True, slots=8, length=64)
    batch.runner = ReplayedSteps(batch)
    rows = batch.add_many(
        requests(("lora-b", 1, 6), ("lora-a", 0, 3), (None, 2, 7), ("lora-b", 3, 5))
    )
    batch.step()
    assert runtime._bank.grouped_usable() and batch._groups_key is not None
    rows += batch.add_many(requests(("pfx", 0, 4), ("lora-a", 2, 6)))
    while batch.active:
        batch.step()
    stacks = list(runtime._bank._stacks.values())
    from_bank = [shape for shape, stack in grouped_calls if any(stack is s for s in stacks)]
    assert from_bank and all(shape[-2] == 1 for shape in from_bank)  # decode steps took it
    assert_alone(tiny_llama_dir, folders, rows)


def test_the_grouped_path_stays_off_where_it_was_not_asked_for(causal, monkeypatch):
    _, _, runtime = causal
    from adaptory.adapters.serving.lora_bank import grouped_self_check

    monkeypatch.delenv("ADAPTORY_GROUPED_LORA", raising=False)
    runtime.load("lora-a")  # the bank has stacks only once an adapter is in it (any test order)
    stack = next(iter(runtime._bank._stacks.values()))
    on_cuda = stack.a.device.type == "cuda"
    expected = on_cuda and grouped_self_check(stack.a.device, stack.a.dtype, stack.a.shape[1])
    assert runtime._bank.grouped_usable() == expected  # the CPU keeps the gather path
    monkeypatch.setenv("ADAPTORY_GROUPED_LORA", "0")
    assert not runtime._bank.grouped_usable()
