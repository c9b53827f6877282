"""Merging and merged export checked against oracles the test computes itself.

Each expected value comes from outside the code under test: PEFT's `add_weighted_adapter`
called directly on the same two parents, the parents' own safetensors, or the adapter run by
`PeftModel` on its NF4 base. Parents are two different random LoRAs (serving_helpers), so a
merge that ignores one parent, a weight, the density or the sign election lands elsewhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from serving_helpers import fp32_4bit_reference, make_classifier, make_lora, register

from adaptory.adapters.bases.loading import load_base
from adaptory.adapters.merging.export import export_merged
from adaptory.adapters.merging.merge import COMBINATIONS, merge_adapters
from adaptory.cli.main import cli
from adaptory.registry import Registry

SEEDS = (11, 22)  # the two parents' seeds: different random LoRAs
WEIGHTS = (0.7, 0.3)
LABELS = ["negative", "positive"]
PROMPTS = ["the cat sat on the mat.", "Shout: the dog ran to the park\nAnswer:", "a red ball"]
TEXTS = ["great product, would buy again", "terrible quality, it broke after a week"]

# Adaptory's documented weight mapping (adapters/merging/merge.py docstring): these methods combine A
# and B separately and PEFT scales each factor by √(weight·s), so Adaptory hands PEFT w², making
# each factor carry weight w; every other method gets w itself.
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ALL_METHODS = (
    *FACTOR_METHODS,
    "cat",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
DENSITY_METHODS = tuple(m for m in ALL_METHODS if m.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
DEFAULT_DENSITY, DEFAULT_SIGN = 0.5, "total"  # documented in `adaptory merge --help`


@pytest.fixture
def registry(adaptory_home):
    return Registry(adaptory_home)


@pytest.fixture(scope="module")
def lora_folders(tiny_llama_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("oracle-parents")
    return [make_lora(tiny_llama_dir, root / f"p{seed}", seed=seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def classifier_folders(tiny_bert_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("oracle-classifiers")
    return [
        make_classifier(tiny_bert_dir, root / f"c{seed}", seed=seed, labels=LABELS)
        for seed in SEEDS
    ]


@pytest.fixture
def pair(registry, lora_folders, tiny_llama_dir):
    for name, folder in zip(("a", "b"), lora_folders, strict=True):
        register(registry, folder, name, tiny_llama_dir)
    return registry


# --- oracles -----------------------------------------------------------------------------------


def peft_handed_weights(method: str, weights) -> list[float]:
    return [w * w for w in weights] if method in FACTOR_METHODS else list(weights)


def peft_oracle(base_dir, folders, method, weights, out: Path, *, density, sign, seed) -> Path:
    """PEFT's add_weighted_adapter on the two parents, called here directly; the saved folder.

    The base is plain float32 transformers: a LoRA merge reads only the adapters' A and B.
    DARE draws its masks from torch's global generator, so it is seeded just before the call,
    as the seed Adaptory records for the merge says.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="p0")
    model.load_adapter(str(folders[1]), adapter_name="p1")
    print(f"oracle {method}: weights={weights} density={density} sign={sign} seed={seed}")
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        ["p0", "p1"],
        peft_handed_weights(method, weights),
        "oracle",
        combination_type=method,
        density=density,
        majority_sign_method=sign,
    )
    model.save_pretrained(str(out), selected_adapters=["oracle"])
    return out / "oracle"


def read_adapter(folder: Path) -> tuple[dict, dict]:
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return config, load_file(str(Path(folder) / "adapter_model.safetensors"))


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{module: ΔW = (lora_alpha/r)·B·A} in float64, from the saved files alone."""
    config, tensors = read_adapter(folder)
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removesuffix(".lora_A.weight"): scale
        * tensors[key.replace("lora_A", "lora_B")].double()
        @ tensors[key].double()
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def rel_distance(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    err = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want)
    ref = sum(float((want[k] ** 2).sum()) for k in want)
    return math.sqrt(err / ref)


def assert_same_merge(got: Path, want: Path, method: str, what: str) -> None:
    """Same rank and targets; SVD methods the same ΔW, the others the same A and B factors."""
    got_config, got_tensors = read_adapter(got)
    want_config, want_tensors = read_adapter(want)
    for key in ("r", "lora_alpha"):
        assert got_config[key] == want_config[key], (what, key)
    assert set(got_config["target_modules"]) == set(want_config["target_modules"]), what
    assert got_tensors.keys() == want_tensors.keys(), what
    distance = rel_distance(deltas(got), deltas(want))
    assert distance < 1e-5, f"{what}: ΔW {distance:.3g} (relative) from PEFT's"
    if not method.endswith("svd"):
        for key, tensor in want_tensors.items():
            torch.testing.assert_close(
                got_tensors[key],
                tensor,
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, k=key: f"{what} {k}: {m}",
            )


def parent_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, s)} of a parent, float64, s = lora_alpha/r."""
    config, tensors = read_adapter(folder)
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removesuffix(".lora_A.weight"): (
            tensors[key].double(),
            tensors[key.replace("lora_A", "lora_B")].double(),
            scale,
        )
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning as PEFT documents it: keep the int(density·n) largest |values|."""
    k = int(density * tensor.numel())
    threshold = tensor.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def expected_deltas(folders, method: str, weights, density=None) -> dict[str, torch.Tensor]:
    """ΔW of a merge computed from the parents' safetensors with the documented formulas."""
    parents = [parent_factors(f) for f in folders]
    out = {}
    for module in parents[0]:
        factors = [p[module] for p in parents]
        if method in ("cat", "svd"):
            exact = sum(w * s * b @ a for (a, b, s), w in zip(factors, weights, strict=True))
            if method == "svd":  # the best rank-max(r_i) approximation of the exact sum
                rank = max(a.shape[0] for a, _, _ in factors)
                u, sv, vh = torch.linalg.svd(exact, full_matrices=False)
                exact = u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank]
            out[module] = exact
        else:  # each (pruned) factor weighted by w·√s, then B·A
            prune = (lambda t: t) if density is None else (lambda t: keep_largest(t, density))
            coeffs = [w * math.sqrt(s) for (_, _, s), w in zip(factors, weights, strict=True)]
            a = sum(c * prune(f[0]) for c, f in zip(coeffs, factors, strict=True))
            b = sum(c * prune(f[1]) for c, f in zip(coeffs, factors, strict=True))
            out[module] = b @ a
    return out


# --- merge methods ------------------------------------------------------------------------------


def test_the_oracles_cover_every_merge_method():
    assert set(ALL_METHODS) == set(COMBINATIONS)


def variants(method: str) -> list[tuple[float | None, str | None]]:
    """(density, majority_sign) passed to Adaptory; None means its default."""
    if method not in DENSITY_METHODS:
        return [(None, None)]
    found = [(None, None), (0.3, None), (0.8, None)]
    if method in SIGN_METHODS:
        found.append((0.3, "frequency"))
    return found


@pytest.mark.parametrize("method", ALL_METHODS)
def test_merge_equals_peft_add_weighted_adapter(
    method, pair, lora_folders, tiny_llama_dir, tmp_path
):
    """Adaptory's stored merge equals PEFT's own merge of the same parents, for each density and
    sign election; different densities (and signs) give different merges."""
    stored = {}
    for i, (density, sign) in enumerate(variants(method)):
        result = merge_adapters(
            pair, ["a", "b"], name=f"m{i}", method=method, weights=list(WEIGHTS),
            density=density, majority_sign=sign, evaluate=False,
        )  # fmt: skip
        seed = result.entry.training_config["merge"]["seed"]
        if method in DENSITY_METHODS:
            density = DEFAULT_DENSITY if density is None else density
        sign = sign or DEFAULT_SIGN
        what = f"{method} weights={WEIGHTS} density={density} sign={sign} seed={seed}"
        want = peft_oracle(
            tiny_llama_dir, lora_folders, method, WEIGHTS, tmp_path / f"o{i}",
            density=density, sign=sign, seed=seed,
        )  # fmt: skip
        got = pair.files(result.entry)
        assert_same_merge(got, want, method, what)
        stored[(density, sign)] = deltas(got)
    if method in DENSITY_METHODS:
        assert rel_distance(stored[(0.3, "total")], stored[(0.8, "total")]) > 0.05, method
    if method in SIGN_METHODS:
        assert rel_distance(stored[(0.3, "total")], stored[(0.3, "frequency")]) > 0.01, method


@pytest.mark.parametrize(
    ("method", "density"),
    [("linear", None), ("cat", None), ("svd", None), ("magnitude_prune", 0.3)],
)
def test_merge_follows_the_documented_formula(method, density, pair, lora_folders):
    """ΔW of the stored merge, computed from the parents' safetensors without PEFT's merge code:
    cat is Σ wᵢ·ΔWᵢ, svd its best rank-r approximation, linear and magnitude_prune
    (Σ wᵢ·√sᵢ·Bᵢ)(Σ wⱼ·√sⱼ·Aⱼ) over the (pruned) factors."""
    result = merge_adapters(
        pair, ["a", "b"], name="m", method=method, weights=list(WEIGHTS), density=density,
        evaluate=False,
    )  # fmt: skip
    got = deltas(pair.files(result.entry))
    want = expected_deltas(lora_folders, method, WEIGHTS, density)
    tolerance = 1e-4 if method == "svd" else 1e-5  # svd: float32 LAPACK against float64
    distance = rel_distance(got, want)
    assert distance < tolerance, f"{method} weights={WEIGHTS}: ΔW {distance:.3g} from the formula"
    exact = expected_deltas(lora_folders, "cat", WEIGHTS)
    if method == "cat":
        assert result.entry.peft_config["r"] == 8
    else:  # the rank-4 merges cannot hold the rank-8 exact sum: the oracle is not vacuous
        assert rel_distance(want, exact) > 0.01, method


def test_cli_merge_passes_weights_density_and_sign(pair, lora_folders, tiny_llama_dir, tmp_path):
    """`adaptory merge` stores what PEFT computes for the options given on the command line."""
    args = ["merge", "a", "b", "--name", "m", "--method", "dare_ties", "--weights", "0.7,0.3",
            "--density", "0.3", "--majority-sign", "frequency", "--no-eval"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    entry = pair.resolve("m")
    seed = entry.training_config["merge"]["seed"]
    want = peft_oracle(
        tiny_llama_dir, lora_folders, "dare_ties", WEIGHTS, tmp_path / "o",
        density=0.3, sign="frequency", seed=seed,
    )  # fmt: skip
    assert_same_merge(pair.files(entry), want, "dare_ties", f"cli dare_ties seed={seed}")


# --- classification heads ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "weights"), [("linear", (0.7, 0.3)), ("cat", (1.0, 3.0))])
def test_merged_head_is_the_weighted_mean_of_the_parents_heads(
    method, weights, registry, classifier_folders, tiny_bert_dir
):
    """Every non-LoRA tensor (the classifier head PEFT saves) of the merge is Σ wᵢ·hᵢ / Σ wᵢ of
    the parents' heads, and PEFT loads that head from the merged folder."""
    from peft import PeftModel

    for name, folder in zip(("c1", "c2"), classifier_folders, strict=True):
        register(registry, folder, name, tiny_bert_dir, task="seq-cls", labels=LABELS)
    result = merge_adapters(
        registry, ["c1", "c2"], name="cc", method=method, weights=list(weights), evaluate=False
    )
    _, merged = read_adapter(registry.files(result.entry))
    parents = [read_adapter(f)[1] for f in classifier_folders]
    heads = [k for k in parents[0] if ".lora_" not in k]
    assert heads and heads == [k for k in merged if ".lora_" not in k]
    for key in heads:
        first, second = (p[key].double() for p in parents)
        assert float((first - second).abs().max()) > 0.1, key  # the parents' heads differ
        want = (weights[0] * first + weights[1] * second) / sum(weights)
        torch.testing.assert_close(
            merged[key].double(), want, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}"
        )

    loaded = load_base(str(tiny_bert_dir), task="seq-cls", quant="none", labels=LABELS)
    model = PeftModel.from_pretrained(loaded.model, str(registry.files(result.entry)))
    head = model.base_model.model.classifier.modules_to_save["default"].weight.double()
    (weight_key,) = [k for k in heads if k.endswith("classifier.weight")]
    want = sum(w * p[weight_key].double() for w, p in zip(weights, parents, strict=True))
    torch.testing.assert_close(head, want / sum(weights), rtol=1e-6, atol=1e-7)


# --- merged export -----------------------------------------------------------------------------


def reference_logits(base_dir, folder: Path, *, task: str, quant: str, texts, labels=None):
    """The adapter run by PeftModel on its base (NF4 as trained, or unquantized), per text."""
    from peft import PeftModel

    loaded = load_base(str(base_dir), task=task, quant=quant, device="cpu", labels=labels)
    model = fp32_4bit_reference(PeftModel.from_pretrained(loaded.model, str(folder)).eval())
    return model_logits(model, loaded.tokenizer, texts)


def model_logits(model, tokenizer, texts) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def max_gap(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_merged_export_equals_the_adapter_on_its_nf4_base(
    registry, lora_folders, tiny_llama_dir, tmp_path
):
    """The default export (NF4 round trip), loaded by plain transformers, gives the logits of
    PeftModel on the NF4 base; `--from-weights original` those of PeftModel on the original base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register(registry, lora_folders[0], "a", tiny_llama_dir)
    export_merged(registry, "a", tmp_path / "rt")
    export_merged(registry, "a", tmp_path / "orig", from_weights="original")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "rt"))
    exported = {
        name: model_logits(
            AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32).eval(),
            tokenizer,
            PROMPTS,
        )
        for name in ("rt", "orig")
    }
    args = (tiny_llama_dir, lora_folders[0])
    on_nf4 = reference_logits(*args, task="causal-lm", quant="nf4", texts=PROMPTS)
    on_original = reference_logits(*args, task="causal-lm", quant="none", texts=PROMPTS)
    nf4_base = model_logits(
        load_base(str(tiny_llama_dir), task="causal-lm", quant="nf4", device="cpu").model,
        tokenizer,
        PROMPTS,
    )
    for got, want in zip(exported["rt"], on_nf4, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(exported["orig"], on_original, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert max_gap(on_nf4, nf4_base) > 0.1  # the adapter matters
    assert max_gap(on_nf4, on_original) > 1e-3  # the round trip matters


def test_cli_merged_classifier_export_equals_the_adapter_on_its_nf4_base(
    registry, classifier_folders, tiny_bert_dir, tmp_path
):
    """`adaptory export --merged` of a classifier, loaded by AutoModelForSequenceClassification,
    gives the logits of PeftModel on the NF4 BERT base with the adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    register(registry, classifier_folders[0], "c", tiny_bert_dir, task="seq-cls", labels=LABELS)
    result = CliRunner().invoke(cli, ["export", "c", "--merged", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "m"), dtype=torch.float32
    ).eval()
    assert model.config.id2label == dict(enumerate(LABELS))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    got = model_logits(model, tokenizer, TEXTS)
    args = (tiny_bert_dir, classifier_folders[0])
    want = reference_logits(*args, task="seq-cls", quant="nf4", texts=TEXTS, labels=LABELS)
    on_original = reference_logits(*args, task="seq-cls", quant="none", texts=TEXTS, labels=LABELS)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert max_gap(want, on_original) > 1e-3  # the round trip matters
