"""The batched mixed-LoRA path gives what PEFT's own mixed batch (adapter_names=) gives."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from adaptory.adapters.bases.loading import load_base
from adaptory.adapters.serving.lora_bank import LoraBank
from adaptory.registry.errors import ConfigError

ADAPTERS = {  # name: (rank, alpha, targets, rslora)
    "a": (4, 8, ["q_proj", "v_proj"], False),
    "b": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "c": (2, 4, ["gate_proj", "down_proj"], True),
}


@pytest.fixture(scope="module")
def saved_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    for seed, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            use_rslora=rslora,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base.model, config, adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base.model = model.unload()
    return root


def _load(folder, name):
    return (
        load_file(folder / name / "adapter_model.safetensors"),
        json.loads((folder / name / "adapter_config.json").read_text()),
    )


def _inputs(tokenizer):
    texts = ["the cat sat on the mat", "a red ball", "the dog ran", "my order arrived late", "tea"]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["compute-dtype", "wider-bank"])
def test_bank_matches_peft_mixed_batch(tiny_llama_dir, saved_adapters, dtype):
    """Also with the bank's weights in another dtype than the base's outputs (added back in
    the output's dtype)."""
    rows = ["a", None, "b", "c", "a"]
    ref_base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    first = "a"
    peft_model = PeftModel.from_pretrained(
        ref_base.model, saved_adapters / first, adapter_name=first
    )
    for name in ADAPTERS:
        if name != first:
            peft_model.load_adapter(saved_adapters / name, adapter_name=name)
    inputs = _inputs(ref_base.tokenizer)
    with torch.no_grad():
        expected = peft_model(**inputs, adapter_names=[r or "__base__" for r in rows]).logits
        only_b = peft_model(**inputs, adapter_names=["b"] * len(rows)).logits

    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model, dtype=dtype)
    for name in ADAPTERS:
        bank.add(name, *_load(saved_adapters, name))
    assert next(iter(bank._stacks.values())).a.dtype == (dtype or torch.float32)
    with torch.no_grad(), bank.rows(rows):
        got = base.model(**inputs).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), bank.rows(["b"] * len(rows)):  # one adapter: its own matmuls
        torch.testing.assert_close(base.model(**inputs).logits, only_b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = base.model(**inputs).logits  # outside rows(): the plain base
    torch.testing.assert_close(plain[1], got[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0], got[0])


def test_remove_frees_the_slot_and_reuses_it(tiny_llama_dir, saved_adapters):
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    bank.add("a", *_load(saved_adapters, "a"))
    slot_b = bank.add("b", *_load(saved_adapters, "b"))
    size = bank.nbytes()
    bank.remove("b")
    assert bank.add("c", *_load(saved_adapters, "c")) == slot_b
    assert bank.nbytes() >= size  # stacks keep their slots; nothing reallocated per swap
    with pytest.raises(ConfigError):
        bank.add("a", *_load(saved_adapters, "a"))


def test_dora_is_refused(tiny_llama_dir, saved_adapters):
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    state, cfg = _load(saved_adapters, "a")
    cfg["use_dora"] = True
    with pytest.raises(ConfigError, match="use_dora"):
        LoraBank(base.model).add("a", state, cfg)


def test_a_slot_freed_by_remove_carries_nothing_into_its_next_adapter(
    tiny_llama_dir, saved_adapters
):
    """ "b" adapts q/k/v/o; once removed, "a" (q and v only) takes its slot. Rows of "a" must get
    exactly PEFT's "a": none of b's k_proj/o_proj weights may stay behind in the slot."""
    ref_base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    peft_model = PeftModel.from_pretrained(ref_base.model, saved_adapters / "a", adapter_name="a")
    inputs = _inputs(ref_base.tokenizer)
    with torch.no_grad():
        expected = peft_model(**inputs).logits

    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    bank.add("b", *_load(saved_adapters, "b"))
    freed = bank.slots["b"]
    bank.remove("b")
    bank.add("a", *_load(saved_adapters, "a"))
    assert bank.slots["a"] == freed  # the freed slot was reused
    with torch.no_grad(), bank.rows(["a"] * len(inputs["input_ids"])):
        got = base.model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _bank(tiny_llama_dir):
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    return base, bank


def _logits(base, bank, rows):
    inputs = _inputs(base.tokenizer)
    with torch.no_grad(), bank.rows(rows):
        return base.model(**inputs).logits


def test_reserve_makes_exact_room_and_filling_it_never_reallocates(tiny_llama_dir, saved_adapters):
    """reserve(n) gives n adapter slots plus the zero slot, once; adding up to n adapters of
    known modules reallocates nothing (the version a captured graph checks stays), reserving
    what is there already changes nothing, and a resize keeps every slot's weights."""
    base, bank = _bank(tiny_llama_dir)
    bank.reserve(2)
    assert bank.capacity == 3
    bank.add("a", *_load(saved_adapters, "a"))  # allocates the q/v stacks at 3 slots
    version, per_slot = bank.version, bank.nbytes() // 3
    bank.add("a2", *_load(saved_adapters, "a"))
    bank.reserve(2)
    bank.reserve(1)
    assert (bank.capacity, bank.version, bank.nbytes()) == (3, version, 3 * per_slot)
    before = _logits(base, bank, ["a", "a2", None, "a", "a2"])
    bank.reserve(3)  # one more than there is room for
    assert bank.capacity == 4 and bank.version != version  # reallocated: graphs must know
    version = bank.version
    bank.reserve(5)
    assert (bank.capacity, bank.nbytes()) == (6, 6 * per_slot) and bank.version != version
    version = bank.version
    torch.testing.assert_close(_logits(base, bank, ["a", "a2", None, "a", "a2"]), before)
    for name in ("a3", "a4", "a5"):
        bank.add(name, *_load(saved_adapters, "a"))
    assert (bank.capacity, bank.version) == (6, version)
    bank.add("a6", *_load(saved_adapters, "a"))  # past the reserve: the stacks double
    assert (bank.capacity, bank.nbytes()) == (12, 12 * per_slot)


def test_rows_naming_adapters_not_in_the_bank_name_the_first(tiny_llama_dir, saved_adapters):
    _, bank = _bank(tiny_llama_dir)
    bank.add("a", *_load(saved_adapters, "a"))
    with pytest.raises(KeyError, match="adapter 'nope' is not in the bank"):
        with bank.rows(["a", "nope", None, "zzz"]):
            pass


def test_rows_from_without_a_reuse_key_gathers_each_block_afresh(tiny_llama_dir, saved_adapters):
    """Two blocks of mixed rows of one length, no `reuse` key: the second must not run on the
    per-row weights gathered for the first. Each equals `rows` with the same adapters."""
    base, bank = _bank(tiny_llama_dir)
    for name in ADAPTERS:
        bank.add(name, *_load(saved_adapters, name))
    inputs = _inputs(base.tokenizer)
    for rows in (["a", "b", "c", None, "a"], ["c", "a", None, "b", "b"]):
        slots = torch.tensor([bank.slot_of(r) for r in rows])
        with torch.no_grad(), bank.rows_from(slots):
            got = base.model(**inputs).logits
        torch.testing.assert_close(got, _logits(base, bank, rows))


def _with_pair(state: dict, module: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    """`state` with the lora_A / lora_B of the first key that names `module` replaced."""
    key = next(k for k in state if f"{module}.lora_A" in k)
    state = dict(state)
    state[key], state[key.replace("lora_A", "lora_B")] = a, b
    return state


def test_add_refuses_tensors_that_are_not_a_low_rank_pair_of_the_modules_size(
    tiny_llama_dir, saved_adapters
):
    """Checked before anything changes, each with its message: a 3-D lora_A, rank 0, a B·A of
    another size than the module. Rank 1 is a pair like any other."""
    _, bank = _bank(tiny_llama_dir)
    state, config = _load(saved_adapters, "a")
    key = next(k for k in state if "q_proj.lora_A" in k)
    a, b = state[key], state[key.replace("lora_A", "lora_B")]
    out_f, in_f = b.shape[0], a.shape[1]
    path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    pair = "which do not form a low-rank pair"
    cases = {
        "3-D A": (a.unsqueeze(-1), b, f"lora_A {tuple(a.shape) + (1,)} and lora_B"),
        "rank 0": (a[:0], b[:, :0], f"lora_A (0, {in_f}) and lora_B ({out_f}, 0), {pair}"),
        "ranks differ": (a, b[:, :-1], f"and lora_B ({out_f}, {b.shape[1] - 1}), {pair}"),
        "short B": (a, b[:-1], f"expects ({out_f} x {in_f}) but the adapter's B·A is "
                               f"({out_f - 1} x {in_f})"),
    }  # fmt: skip
    for what, (bad_a, bad_b, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            bank.add("bad", _with_pair(state, "q_proj", bad_a, bad_b), config)
        assert path in info.value.message and message in info.value.message, what
        assert not bank.slots
    for bad_a, bad_b, message in (
        (a.to(torch.int32), b, "torch.int32 / torch.float32 LoRA weights; they must be floating"),
        (a, b.to(torch.int64), "torch.float32 / torch.int64 LoRA weights; they must be floating"),
        (a, torch.full_like(b, float("nan")), "has NaN or infinite LoRA weights"),
        (torch.full_like(a, float("inf")), b, "has NaN or infinite LoRA weights"),
    ):
        with pytest.raises(ConfigError, match=message):
            bank.add("bad", _with_pair(state, "q_proj", bad_a, bad_b), config)
    for alpha in ([8], "eight"):  # a TypeError and a ValueError from the scale's float()
        with pytest.raises(ConfigError, match="no LoRA scale for"):
            bank.add("bad", state, {**config, "lora_alpha": alpha})
    one = _with_pair(state, "q_proj", a[:1], b[:, :1])
    assert bank.add("rank1", one, config) == 1


def test_add_refuses_pairs_of_the_wrong_dimensions_or_sizes(tiny_llama_dir, saved_adapters):
    """A 1-D A or B, a 3-D B, A of a lower rank than B, A wider or narrower than the module's
    input, B taller than its output: each a ConfigError with its message, nothing added."""
    _, bank = _bank(tiny_llama_dir)
    state, config = _load(saved_adapters, "a")
    key = next(k for k in state if "q_proj.lora_A" in k)
    a, b = state[key], state[key.replace("lora_A", "lora_B")]
    (r, in_f), out_f = a.shape, b.shape[0]
    pair = "which do not form a low-rank pair"
    cases = {
        "1-D A": (a[:, 0], b, f"lora_A ({r},) and lora_B ({out_f}, {r}), {pair}"),
        "1-D B": (a, b[:, 0], f"lora_A ({r}, {in_f}) and lora_B ({out_f},), {pair}"),
        "3-D B": (a, b.unsqueeze(-1), f"and lora_B ({out_f}, {r}, 1), {pair}"),
        "A of a lower rank": (a[:-1], b, f"lora_A ({r - 1}, {in_f}) and lora_B ({out_f}, {r})"),
        "wide A": (torch.cat([a, a[:, :1]], 1), b, f"B·A is ({out_f} x {in_f + 1})"),
        "narrow A": (a[:, :-1], b, f"B·A is ({out_f} x {in_f - 1})"),
        "tall B": (a, torch.cat([b, b[:1]]), f"B·A is ({out_f + 1} x {in_f})"),
    }
    for what, (bad_a, bad_b, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            bank.add("bad", _with_pair(state, "q_proj", bad_a, bad_b), config)
        assert message in info.value.message, what
        assert not bank.slots and not bank._stacks, what


def test_an_empty_bank_runs_base_rows(tiny_llama_dir):
    """Before any adapter is added (a server answering base-model requests) rows of None are
    the plain base."""
    base, bank = _bank(tiny_llama_dir)
    inputs = _inputs(base.tokenizer)
    with torch.no_grad():
        plain = base.model(**inputs).logits
        with bank.rows([None] * len(inputs["input_ids"])):
            torch.testing.assert_close(base.model(**inputs).logits, plain)


class _BankGathers(TorchFunctionMode):
    """Counts the per-row gathers (index_select) from the bank's stacked A and B tensors."""

    def __init__(self, bank):
        super().__init__()
        self.stacks = [t for s in bank._stacks.values() for t in (s.a, s.b)]
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.index_select and any(args[0] is t for t in self.stacks):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _one_slot_bytes(bank) -> int:
    """What one row's gathered A and B take: one slot of every stack."""
    return sum(s.a[0].nbytes + s.b[0].nbytes for s in bank._stacks.values())


def test_mixed_rows_gather_once_per_block_within_the_cache_budget(tiny_llama_dir, saved_adapters):
    """`rows`: one adapter or none for every row gathers nothing (plain matmuls); mixed rows
    gather each layer's A and B once for the block (a prefill and its decode steps) while the
    rows' gathered weights fit gather_cache_bytes (exactly fitting included), and on every
    forward when they do not. The logits are the same either way."""
    base, bank = _bank(tiny_llama_dir)
    for name in ADAPTERS:
        bank.add(name, *_load(saved_adapters, name))
    inputs = _inputs(base.tokenizer)
    n = len(inputs["input_ids"])
    mixed = ["a", "b", None, "c", "a"]
    layer = 2 * len(bank._stacks)  # A and B of every adapted layer: one forward's gathers

    def gathers(rows) -> tuple[int, torch.Tensor]:
        with torch.no_grad(), _BankGathers(bank) as spy, bank.rows(rows):
            first = base.model(**inputs).logits
            torch.testing.assert_close(base.model(**inputs).logits, first)
        return spy.count, first

    assert gathers(["b"] * n)[0] == 0
    assert gathers([None] * n)[0] == 0
    fits = _one_slot_bytes(bank) * n
    counts = {}
    for budget in (fits * 1000, fits, fits - 1):
        bank.gather_cache_bytes = budget
        counts[budget], logits = gathers(mixed)
        torch.testing.assert_close(logits, _logits(base, bank, mixed))
    assert counts == {fits * 1000: layer, fits: layer, fits - 1: 2 * layer}


def test_rows_from_keeps_gathered_weights_across_blocks_with_one_reuse_key(
    tiny_llama_dir, saved_adapters
):
    """`rows_from`: one slot for every row takes the plain-matmul shortcut unless `static`;
    mixed rows under one `reuse` key gather once across blocks (a decode batch between joins
    and leaves) within the budget, and again per block over it; a new key gathers afresh, also
    one that sorts below the last."""
    base, bank = _bank(tiny_llama_dir)
    for name in ADAPTERS:
        bank.add(name, *_load(saved_adapters, name))
    inputs = _inputs(base.tokenizer)
    n = len(inputs["input_ids"])
    layer = 2 * len(bank._stacks)

    def run(rows, **kw) -> tuple[int, torch.Tensor]:
        slots = torch.tensor([bank.slot_of(r) for r in rows])
        with torch.no_grad(), _BankGathers(bank) as spy, bank.rows_from(slots, **kw):
            logits = base.model(**inputs).logits
        torch.testing.assert_close(logits, _logits(base, bank, rows))
        return spy.count, logits

    assert run(["c"] * n)[0] == 0
    assert run(["c"] * n, static=True)[0] == layer  # a graph replays any slots: no shortcut
    mixed, other = ["a", "b", None, "c", "a"], ["c", "c", "a", None, "b"]
    fits = _one_slot_bytes(bank) * n
    for budget, second in ((fits * 1000, 0), (fits, 0), (fits - 1, layer)):
        bank.gather_cache_bytes = budget
        assert [run(mixed, reuse=("batch", 2))[0] for _ in range(2)] == [layer, second], budget
        assert run(other, reuse=("batch", 1))[0] == layer  # another key: gathered afresh
