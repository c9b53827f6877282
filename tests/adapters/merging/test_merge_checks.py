"""Every refusal of `check_merge` and every value it fills in, on real registry Entry objects
(nothing is loaded): the exact message a user reads, each boundary, and the checked spec.

Written against the mutants of adapters/merging/merge.py that the model-level merge tests let
survive (docs/TESTING.md); fast, so `make mutation` runs it first for that module.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from adaptory.adapters.merging.merge import (
    COMBINATIONS,
    DEFAULT_DENSITY,
    DENSITY_METHODS,
    SEPARATE_AB,
    SIGN_METHODS,
    SVD_METHODS,
    MergeSpec,
    _merged_dataset,
    check_merge,
    peft_weights,
)
from adaptory.registry.entry import Entry
from adaptory.registry.errors import BaseMismatch, ConfigError

FINGERPRINT = {"weights": "w" * 64, "tokenizer": "t" * 64, "quant": "nf4+dq"}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def entry(name: str = "a", version: int = 1, **over) -> Entry:
    fields = {
        "id": version, "name": name, "version": version, "digest": "d" * 64, "method": "lora",
        "task": "causal-lm", "base_model": "tiny", "base_fingerprint": dict(FINGERPRINT),
        "peft_config": dict(LORA), "training_config": {}, "dataset": {}, "metrics": {},
        "loss_history": [], "parents": [], "tags": [], "description": None, "extra": {},
        "created_at": "2025-01-01T00:00:00+00:00", "size_bytes": 1,
    }  # fmt: skip
    fields.update(over)
    return Entry(**fields)


def refused(parents, error=ConfigError, **kwargs) -> str:
    kwargs.setdefault("method", "linear")
    with pytest.raises(error) as info:
        check_merge(parents, **kwargs)
    return info.value.message


A, B, C = entry("a"), entry("b"), entry("c")


# --- method and count --------------------------------------------------------------------------


def test_unknown_method_and_too_few_parents():
    assert refused([A, B], method="average") == "unknown merge method 'average'"
    assert refused([A]) == "merging needs at least two adapters"
    assert refused([]) == "merging needs at least two adapters"
    assert check_merge([A, A], method="linear").weights == (0.5, 0.5)  # the same one twice


@pytest.mark.parametrize("method", COMBINATIONS)
def test_every_method_is_accepted_with_defaults(method):
    spec = check_merge([A, B, C], method=method)
    assert spec.method == method and spec.weights == (1 / 3, 1 / 3, 1 / 3)
    assert spec.density == (DEFAULT_DENSITY if method in DENSITY_METHODS else None)
    assert spec.majority_sign == ("total" if method in SIGN_METHODS else None)
    assert spec.svd_rank is None and spec.seed == 0


# --- what merges -------------------------------------------------------------------------------


def test_only_lora_merges():
    prefix = entry("p", method="prefix")
    assert refused([A, prefix]) == "p:1 is a prefix adapter; only LoRA adapters merge"
    unknown = entry("u", method=None)
    assert refused([unknown, A]) == "u:1 is a non-LoRA adapter; only LoRA adapters merge"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("use_dora", True, "uses DoRA"),
        ("use_rslora", True, "uses rsLoRA"),
        ("rank_pattern", {"q_proj": 8}, "has per-module ranks (rank_pattern)"),
        ("lora_bias", True, "trains LoRA biases"),
        ("target_parameters", ["w"], "targets nn.Parameters"),
        ("trainable_token_indices", [1, 2], "trains token embeddings"),
    ],
)
def test_configurations_peft_merges_wrongly_are_refused(key, value, reason):
    odd = entry("odd", peft_config={**LORA, key: value})
    message = refused([A, odd])
    assert message.startswith(f"odd:1 {reason}") and message.endswith(
        "; the merge would be silently wrong"
    )
    falsy = entry("ok", peft_config={**LORA, key: type(value)()})  # False, {} or []
    check_merge([A, falsy], method="linear")


def test_trained_biases_and_whole_modules_are_refused_but_a_classifier_head_is_not():
    biased = entry("b", peft_config={**LORA, "bias": "lora_only"})
    assert refused([A, biased]) == (
        "b:1 trains biases (bias='lora_only'), which PEFT's merge drops"
    )
    check_merge([A, entry("n", peft_config={k: v for k, v in LORA.items() if k != "bias"})],
                method="linear")  # fmt: skip  # no bias key means "none"
    saved = {**LORA, "modules_to_save": ["lm_head"]}
    assert refused([A, entry("m", peft_config=saved)]) == (
        "m:1 also trains whole modules (['lm_head']), which PEFT cannot merge"
    )
    heads = [
        entry(n, task="seq-cls", peft_config={**LORA, "modules_to_save": ["classifier"]},
              extra={"labels": ["neg", "pos"]})
        for n in ("x", "y")
    ]  # fmt: skip
    check_merge(heads, method="linear")


# --- one base, one task ------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["weights", "tokenizer", "quant"])
def test_each_fingerprint_part_must_match_in_every_parent(part):
    other = entry("c", base_fingerprint={**FINGERPRINT, part: "x" * 64})
    message = refused([A, B, other], BaseMismatch)
    assert message == (
        f"a:1 and c:1 were trained on different bases: their {part} fingerprints differ "
        f"({FINGERPRINT[part][:12]} vs {'x' * 12})"
    )
    lower = entry("l", base_fingerprint={**FINGERPRINT, part: "a" * 64})  # sorts below the first
    assert refused([A, lower], BaseMismatch).startswith("a:1 and l:1 were trained on different")


def test_without_fingerprints_the_base_references_must_match():
    bare = [entry(n, base_fingerprint=None) for n in ("a", "b")]
    check_merge(bare, method="linear")
    check_merge([A, entry("b", base_fingerprint={})], method="linear")  # one side unknown
    elsewhere = entry("c", base_fingerprint=None, base_model="other")
    assert refused([*bare, elsewhere], BaseMismatch) == (
        "a:1 and c:1 were made for different bases (tiny vs other)"
    )
    assert refused([elsewhere, A], BaseMismatch).startswith("c:1 and a:1 were made for")


def test_tasks_must_match_and_classifiers_need_the_same_labels():
    cls = entry("k", task="seq-cls", extra={"labels": ["neg", "pos"]})
    assert refused([A, B, cls]) == "a:1 is a causal-lm adapter but k:1 is seq-cls"
    nolabels = entry("n", task="seq-cls")
    assert refused([nolabels, cls]) == (
        "n:1 is a classification adapter without recorded label names"
    )
    swapped = entry("s", task="seq-cls", extra={"labels": ["pos", "neg"]})
    assert refused([cls, cls, swapped]) == (
        "s:1 classifies into ['pos', 'neg'] but k:1 into ['neg', 'pos']"
    )
    assert check_merge([cls, replace(cls, name="k2")], method="linear").weights == (0.5, 0.5)
    # the odd one second of two, and labels that sort below the first's: each pair is compared
    assert refused([A, cls]) == "a:1 is a causal-lm adapter but k:1 is seq-cls"
    assert refused([cls, A]) == "k:1 is a seq-cls adapter but a:1 is causal-lm"
    assert refused([swapped, cls]) == (
        "k:1 classifies into ['neg', 'pos'] but s:1 into ['pos', 'neg']"
    )


# --- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out"]
)
@pytest.mark.parametrize("method", ["linear", "cat"])
def test_layer_selection_must_match_for_every_method(key, method):
    other = entry("c", peft_config={**LORA, key: [1]})
    assert refused([A, B, other], method=method) == (
        f"a:1 and c:1 differ in {key} (None vs [1]); PEFT would apply the first one's to the merge"
    )


def test_a_pattern_and_a_list_of_targets_never_combine():
    pattern = entry("p", peft_config={**LORA, "target_modules": ".*proj"})
    for method in ("linear", "cat"):
        for pair in ([A, pattern], [pattern, A]):  # the message names the pattern's owner
            assert refused(pair, method=method).startswith(
                "p:1 names its target modules by a pattern and a:1 by a list"
            )
    both = [entry(n, peft_config={**LORA, "target_modules": ".*proj"}) for n in "xy"]
    check_merge(both, method="linear")


@pytest.mark.parametrize("method", COMBINATIONS)
def test_ranks_and_targets_must_match_only_where_a_and_b_combine_separately(method):
    wider = entry("w", peft_config={**LORA, "r": 8})
    other = entry("o", peft_config={**LORA, "target_modules": ["q_proj", "k_proj"]})
    reordered = entry("r", peft_config={**LORA, "target_modules": ["v_proj", "q_proj"]})
    check_merge([A, reordered], method=method)  # the same set in another order
    if method in SEPARATE_AB:
        assert refused([A, B, wider], method=method) == (
            f"{method} needs equal ranks: a:1 has r=4, w:1 has r=8"
        )
        assert refused([wider, A], method=method) == (  # the wider one first
            f"{method} needs equal ranks: w:1 has r=8, a:1 has r=4"
        )
        assert refused([A, other], method=method) == (
            f"{method} combines A and B matrices module by module and needs the same target "
            "modules: a:1 targets q_proj,v_proj, o:1 k_proj,q_proj"
        )
    else:
        check_merge([A, wider, other], method=method)


def test_separate_methods_are_exactly_those_without_svd_or_cat():
    assert set(SEPARATE_AB) == set(COMBINATIONS) - set(SVD_METHODS) - {"cat"}


# --- weights -----------------------------------------------------------------------------------


def test_weights_are_one_per_parent_finite_and_not_all_zero():
    assert check_merge([A, B], method="linear", weights=[1, 3]).weights == (1.0, 3.0)
    assert all(
        type(w) is float for w in check_merge([A, B], method="linear", weights=[1, 3]).weights
    )
    assert refused([A, B, C], weights=[0.5, 0.5]) == "2 weight(s) for 3 adapters"
    with pytest.raises(ConfigError) as info:
        check_merge([A, B, C], method="linear", weights=[1])
    assert info.value.hint.endswith("--weights 0.5,0.5,0.5")
    for bad in (math.nan, math.inf, -math.inf):
        assert refused([A, B], weights=[1, bad]) == "weights must be finite numbers"
    assert refused([A, B], weights=[0, 0.0]) == "all weights are zero"
    assert check_merge([A, B], method="linear", weights=[0, 1]).weights == (0.0, 1.0)


def test_negative_weights_only_with_cat():
    assert check_merge([A, B], method="cat", weights=[1, -1]).weights == (1.0, -1.0)
    for method in sorted(set(COMBINATIONS) - {"cat"}):
        assert refused([A, B, C], method=method, weights=[1, -0.5, -2]) == (
            f"negative weight -0.5 for b:1: PEFT's {method} merge is silently wrong with "
            "negative weights (the sign lands on A only, or is lost in pruning and SVD)"
        )


def test_classifier_weights_that_sum_to_zero_are_refused():
    """A classifier merge takes the weight-averaged head, undefined when the weights sum to 0;
    a generation adapter has no head, so the same weights merge."""
    cls = [replace(p, task="seq-cls", extra={"labels": ["neg", "pos"]}) for p in (A, B, C)]
    assert refused(cls[:2], method="cat", weights=[1, -1]) == (
        "the weights 1, -1 sum to 0: a classifier merge takes the weighted mean of the "
        "parents' heads, which is then undefined"
    )
    assert refused(cls, method="cat", weights=[0.3, -0.1, -0.2]).startswith(
        "the weights 0.3, -0.1, -0.2 sum to 0:"
    )
    assert check_merge(cls[:2], method="cat", weights=[1, -0.5]).weights == (1.0, -0.5)
    assert check_merge([A, B], method="cat", weights=[1, -1]).weights == (1.0, -1.0)


def test_peft_gets_squared_weights_only_where_factors_combine_separately():
    for method in COMBINATIONS:
        want = [0.25, 4.0] if method in SEPARATE_AB else [0.5, -2.0]
        assert peft_weights(method, (0.5, -2.0)) == want, method


# --- density, sign, svd rank -------------------------------------------------------------------


def test_density_is_in_the_half_open_unit_interval_and_only_where_it_applies():
    for density in (0.0, -0.1, 1.0001, math.nan):
        message = refused([A, B], method="ties", density=density)
        assert message == f"density {density} is outside (0, 1]"
    assert check_merge([A, B], method="ties", density=1).density == 1.0
    assert type(check_merge([A, B], method="ties", density=1).density) is float
    assert check_merge([A, B], method="ties", density=1e-9).density == 1e-9
    assert refused([A, B], method="linear", density=0.5) == "--density has no effect with linear"
    assert refused([A, B], method="svd", density=1.0) == "--density has no effect with svd"


def test_majority_sign_is_checked_and_only_for_ties_methods():
    assert refused([A, B], method="ties", majority_sign="most") == (
        "unknown majority sign method 'most'"
    )
    assert check_merge([A, B], method="dare_ties", majority_sign="frequency").majority_sign == (
        "frequency"
    )
    assert refused([A, B], method="dare_linear", majority_sign="total") == (
        "--majority-sign has no effect with dare_linear"
    )
    assert refused([A, B], method="linear", majority_sign="bogus") == (
        "unknown majority sign method 'bogus'"
    )


def test_svd_rank_is_at_least_one_and_only_for_svd_methods():
    assert check_merge([A, B], method="svd", svd_rank=1).svd_rank == 1
    assert check_merge([A, B], method="svd", svd_rank=6).svd_rank == 6
    assert type(check_merge([A, B], method="ties_svd", svd_rank=True).svd_rank) is int
    assert refused([A, B], method="svd", svd_rank=0) == "svd rank 0 must be at least 1"
    assert refused([A, B], method="svd", svd_rank=-3) == "svd rank -3 must be at least 1"
    assert refused([A, B], method="linear", svd_rank=4) == "--svd-rank has no effect with linear"
    assert refused([A, B], method="cat", svd_rank=None, weights=[1, 1, 1]) == (
        "3 weight(s) for 2 adapters"
    )


# --- what gets recorded ------------------------------------------------------------------------


def test_the_spec_records_only_what_was_set():
    spec = MergeSpec(method="ties", weights=(0.5, 0.5), density=0.2, majority_sign="total")
    assert spec.to_dict() == {
        "method": "ties", "weights": [0.5, 0.5], "density": 0.2, "majority_sign": "total",
        "seed": 0,
    }  # fmt: skip
    assert MergeSpec(method="cat", weights=(1.0,)).to_dict() == {
        "method": "cat", "weights": [1.0], "seed": 0,
    }  # fmt: skip
    with pytest.raises(AttributeError):
        spec.method = "cat"  # type: ignore[misc]


def test_the_merged_dataset_lists_each_parent_and_a_shared_eval_file():
    one = entry("a", dataset={"eval_file": "/d/e.jsonl", "rows": 3})
    two = entry("b", dataset={"eval_file": "/d/e.jsonl"})
    three = entry("c", dataset={"eval_file": "/d/other.jsonl"})
    bare = entry("d", dataset={})
    assert _merged_dataset([one, two, bare]) == {
        "merged_from": [
            {"ref": "a:1", "eval_file": "/d/e.jsonl", "rows": 3},
            {"ref": "b:1", "eval_file": "/d/e.jsonl"},
            {"ref": "d:1"},
        ],
        "eval_file": "/d/e.jsonl",
    }
    assert "eval_file" not in _merged_dataset([one, three])
    assert "eval_file" not in _merged_dataset([bare, bare])
