"""The training recipe on tiny bases: every task × method, determinism, resume, the registry
record, a stored-loss regression check, and (slow) the real-MiniLM quality bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from adaptory.adapters.training.evaluate import evaluate_entry, load_adapter_model
from adaptory.adapters.training.loop import TrainConfig, TrainingInterrupted, train_adapter
from adaptory.registry import Registry
from adaptory.registry.errors import BadInput, ConfigError

REPO = Path(__file__).resolve().parents[3]
WORDS = "the cat sat on a mat dog ran to park red ball blue box shop sells books tea".split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shout_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": f"Shout: {words}\nAnswer:", "completion": f" {words.upper()}"})
    return rows


CLS_ROWS = [
    {"text": "great product, would buy again", "label": "pos"},
    {"text": "terrible quality, it broke after a week", "label": "neg"},
    {"text": "the battery lasts all day and the screen is bright", "label": "pos"},
    {"text": "the refund took too long", "label": "neg"},
    {"text": "my order arrived late and the box was broken", "label": "neg"},
    {"text": "the shop sells great books and tea", "label": "pos"},
] * 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only spin (bitsandbytes' OpenMP dequant
    stalls badly on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry(adaptory_home) -> Registry:
    return Registry(adaptory_home)


@pytest.fixture
def shout(tmp_path) -> tuple[Path, Path]:
    return (
        write_jsonl(tmp_path / "shout_train.jsonl", shout_rows(24, 0)),
        write_jsonl(tmp_path / "shout_eval.jsonl", shout_rows(8, 1)),
    )


@pytest.fixture
def cls_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)


def quick(**kw) -> TrainConfig:
    defaults = {"max_steps": 3, "batch_size": 4, "max_length": 48, "seed": 0}
    return TrainConfig(**{**defaults, **kw})


CASES = [
    ("tiny_llama_dir", "causal", "lora", {}),
    ("tiny_llama_dir", "causal", "lora", {"dora": True, "rslora": True}),
    ("tiny_llama_dir", "causal", "prefix", {"prefix_projection": True}),
    ("tiny_llama_dir", "causal", "prompt", {}),
    ("tiny_llama_dir", "causal", "ia3", {}),
    ("tiny_llama_dir", "causal", "lora", {"grad_checkpointing": True, "grad_accum": 2}),
    ("tiny_llama_dir", "causal", "lora", {"quant": "none", "schedule": "linear"}),
    ("tiny_llama_dir", "causal", "prefix", {"quant": "none"}),
    ("tiny_llama_dir", "chat", "lora", {}),
    ("tiny_bert_dir", "cls", "lora", {}),
    ("tiny_bert_dir", "cls", "prompt", {}),
    ("tiny_bert_dir", "cls", "ia3", {}),
    ("tiny_llama_dir", "cls", "lora", {}),
]


@pytest.mark.parametrize(
    "base_fixture,data_kind,method,extra",
    CASES,
    ids=[
        f"{c[0].split('_')[1]}-{c[1]}-{c[2]}{'-' + '-'.join(c[3]) if c[3] else ''}" for c in CASES
    ],
)
def test_trains_every_task_and_method(
    request, registry, shout, cls_data, base_fixture, data_kind, method, extra
):
    base = request.getfixturevalue(base_fixture)
    data = {
        "causal": {"data": str(shout[0]), "eval_data": str(shout[1])},
        "chat": {
            "data": str(REPO / "examples/data/chat/train.jsonl"),
            "eval_split": 0.1,
            "max_length": 128,
        },
        "cls": {"data": str(cls_data)},
    }[data_kind]
    result = train_adapter(
        quick(**{"base": str(base), "name": f"t-{method}", "method": method, **data, **extra}),
        registry=registry,
        show_progress=False,
    )
    entry = result.entry
    assert entry.method == method and result.steps == 3
    assert entry.task == ("seq-cls" if data_kind == "cls" else "causal-lm")
    assert math.isfinite(result.metrics["eval_loss"]) and "base" in result.metrics
    # the stored adapter loads back onto its base and gives the recorded eval numbers
    model, loaded, _ = load_adapter_model(registry, entry.ref)
    assert loaded.fingerprint.digest == entry.base_fingerprint["digest"]
    if data_kind == "cls":
        assert entry.extra["labels"] == ["neg", "pos"]
        assert set(result.metrics["confusion_matrix"]) == {"labels", "matrix"}
    # Training moved the stored adapter off its initialisation: LoRA B starts at zero, IA3
    # scales at one, prompt/prefix embeddings at PEFT's random init from the seed (rebuilt here).
    import torch
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = registry.files(entry.ref)
    stored = load_file(str(folder / "adapter_model.safetensors"))
    peft_config = PeftConfig.from_pretrained(str(folder))
    peft_config.inference_mode = False
    if data_kind == "cls":
        fresh = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
    else:
        fresh = AutoModelForCausalLM.from_pretrained(str(base))
    torch.manual_seed(0)  # the run's seed, set just before PEFT builds the adapter
    init = get_peft_model_state_dict(get_peft_model(fresh, peft_config))
    checked = [k for k in stored if "lora_B" in k or "ia3_l" in k or k == "prompt_embeddings"]
    assert checked
    # 3 Adam steps move a stored weight by at most ~3·lr (a rebuilt init that missed the run's
    # would be ~1 away); prefix_projection stores the MLP's output, which moves further.
    limit = math.inf if extra.get("prefix_projection") else 4 * entry.training_config["lr"]
    for key in checked:
        assert 0 < float((stored[key] - init[key]).abs().max()) < limit, key


def test_registry_record_fields(registry, shout, tiny_llama_dir):
    result = train_adapter(
        quick(
            base=str(tiny_llama_dir),
            name="rec",
            data=str(shout[0]),
            eval_data=str(shout[1]),
            tags=["dev"],
            description="shouting",
            eval_every=1,
        ),
        registry=registry,
        show_progress=False,
    )
    entry = registry.resolve("rec:dev")
    assert entry.ref == result.entry.ref == "rec:1"
    assert entry.base_model == str(tiny_llama_dir)
    assert set(entry.base_fingerprint) == {"digest", "weights", "tokenizer", "quant"}
    assert entry.peft_config["base_model_name_or_path"] == str(tiny_llama_dir)
    assert entry.peft_config["peft_type"] == "LORA"
    tc = entry.training_config
    assert tc["quant"] == "nf4" and tc["lr"] == 2e-3 and tc["max_steps"] == 3
    assert set(TrainConfig.fields()) <= set(tc)
    ds = entry.dataset
    assert ds["format"] == "prompt-completion" and ds["rows_train"] == 24 and ds["rows_eval"] == 8
    assert ds["eval_file"].endswith("shout_eval.jsonl") and len(ds["fingerprint"]) == 64
    m = entry.metrics
    assert {"eval_loss", "perplexity", "exact_match", "base"} <= set(m)
    assert {"eval_loss", "perplexity", "exact_match"} <= set(m["base"])
    steps = [h for h in entry.loss_history if "loss" in h]
    evals = [h for h in entry.loss_history if "eval_loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3] and all("lr" in h for h in steps)
    assert [h["step"] for h in evals] == [1, 2, 3]
    x = entry.extra
    assert x["trainable_params"] > 0 and x["peak_memory_bytes"] > 0 and x["tokens_per_s"] > 0
    assert x["wall_time_s"] > 0
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # eval REF --data FILE records under metrics.evals
    metrics = evaluate_entry(registry, "rec", shout[1])
    assert metrics["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)
    assert registry.resolve("rec").metrics["evals"]["shout_eval.jsonl"]["rows"] == 8


def adapter_bytes(registry: Registry, ref: str) -> bytes:
    return (registry.files(ref) / "adapter_model.safetensors").read_bytes()


def test_same_seed_same_adapter_bytes(registry, cls_data, tiny_bert_dir):
    cfg = {"base": str(tiny_bert_dir), "data": str(cls_data), "max_steps": 4}
    a = train_adapter(quick(name="a", **cfg), registry=registry, show_progress=False)
    b = train_adapter(quick(name="b", **cfg), registry=registry, show_progress=False)
    c = train_adapter(quick(name="c", seed=1, **cfg), registry=registry, show_progress=False)
    assert adapter_bytes(registry, a.entry.ref) == adapter_bytes(registry, b.entry.ref)
    assert a.entry.digest == b.entry.digest
    assert adapter_bytes(registry, a.entry.ref) != adapter_bytes(registry, c.entry.ref)


def test_resume_after_interrupt_gives_the_same_adapter(registry, shout, tiny_llama_dir, tmp_path):
    cfg = {
        "base": str(tiny_llama_dir),
        "data": str(shout[0]),
        "eval_data": str(shout[1]),
        "max_steps": 6,
        "dropout": 0.1,
    }
    whole = train_adapter(quick(name="whole", **cfg), registry=registry, show_progress=False)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train_adapter(
            quick(name="halves", output_dir=str(run_dir), **cfg),
            registry=registry,
            show_progress=False,
            on_step=interrupt,
        )
    assert info.value.exit_code == 130 and "--resume" in info.value.hint
    assert registry.list(name="halves") == []
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = train_adapter(
        TrainConfig(resume=str(run_dir)), registry=registry, show_progress=False
    )
    assert resumed.entry.ref == "halves:1" and resumed.steps == 6
    assert adapter_bytes(registry, "halves") == adapter_bytes(registry, whole.entry.ref)
    assert resumed.entry.loss_history == whole.entry.loss_history
    assert resumed.entry.metrics["base"] == whole.entry.metrics["base"]


def test_periodic_checkpoint_and_early_stopping(registry, cls_data, tiny_bert_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train_adapter(
        quick(
            base=str(tiny_bert_dir),
            name="es",
            data=str(cls_data),
            max_steps=40,
            eval_every=1,
            early_stopping=2,
            checkpoint_every=1,
            lr=0.5,  # large enough that the eval loss soon stops improving
            output_dir=str(run_dir),
        ),
        registry=registry,
        show_progress=False,
    )
    assert result.stopped_early and result.steps < 40
    assert (run_dir / "checkpoint" / "optimizer.pt").is_file()
    assert result.entry.extra["stopped_early"] is True


# Loss numbers of a seeded 4-step run, stored to catch silent changes in the loop (data order,
# masking, schedule, loss scaling). Regenerate deliberately if the recipe changes on purpose.
STORED_LOSSES = [0.709033, 0.694255, 0.698041, 0.692779]


def test_seeded_losses_match_stored_numbers(registry, cls_data, tiny_bert_dir):
    result = train_adapter(
        quick(base=str(tiny_bert_dir), name="reg", data=str(cls_data), max_steps=4, eval_split=0),
        registry=registry,
        show_progress=False,
    )
    losses = [h["loss"] for h in result.loss_history if "loss" in h]
    assert losses == pytest.approx(STORED_LOSSES, abs=2e-3)


def test_config_validation_and_toml(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        TrainConfig(data="x.jsonl")
    with pytest.raises(ConfigError, match="does not support"):
        TrainConfig(base="b", data="d", name="n", task="seq-cls", method="prefix")
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        TrainConfig(base="b", data="d", name="n", method="prefix", grad_checkpointing=True)
    with pytest.raises(ConfigError):
        TrainConfig(base="b", data="d", name="n", eval_data="e", eval_split=0.2)
    with pytest.raises(ConfigError):
        TrainConfig(base="b", data="d", name="n", batch_size=0)
    with pytest.raises(BadInput):
        TrainConfig(base="b", data="d", name="bad/name")
    toml = tmp_path / "c.toml"
    toml.write_text('base = "minilm"\ndata = "d.jsonl"\nname = "n"\nbatch-size = 4\n')
    cfg = TrainConfig.from_toml(toml, batch_size=None, lr=1e-3)
    assert cfg.batch_size == 4 and cfg.lr == 1e-3 and cfg.data == str(tmp_path / "d.jsonl")
    toml.write_text('base = "minilm"\ndata = "d.jsonl"\nname = "n"\nbatch_sise = 4\n')
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'") as info:
        TrainConfig.from_toml(toml)
    assert str(toml) in info.value.message


def test_shipped_configs_load():
    configs = sorted((REPO / "examples" / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "adaptory train" in first, path
        cfg = TrainConfig.from_toml(path)
        assert Path(cfg.data).is_file() or "examples/data" in cfg.data, path


def test_adapters_beat_the_base_on_a_pretrained_tiny_base(registry, tmp_path):
    """On a small from-scratch base, prefix tuning and LoRA learn a fixed text transformation
    (shouting: lower case in, upper case out) well below the base's eval loss."""
    import random

    from adaptory.adapters.training.pretrain import pretrain_base

    rng = random.Random(5)
    lines = []
    for _ in range(400):  # a corpus where both cases of the words occur
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        loud = " ".join(w.upper() for w in words[: rng.randint(1, len(words))])
        lines.append(f"{' '.join(words)}. {loud}.")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines))
    base = tmp_path / "pre"
    pretrain_base(
        base,
        corpus=[corpus],
        size="tiny",
        steps=80,
        seq_len=64,
        batch_size=8,
        lr=3e-3,
        seed=0,
        show_progress=False,
    )
    train = write_jsonl(tmp_path / "tr.jsonl", shout_rows(64, 0))
    held = write_jsonl(tmp_path / "ev.jsonl", shout_rows(16, 1))
    for method in ("lora", "prefix"):
        result = train_adapter(
            TrainConfig(
                base=str(base),
                name=f"shout-{method}",
                method=method,
                data=str(train),
                eval_data=str(held),
                epochs=6,
                batch_size=8,
                max_length=48,
            ),
            registry=registry,
            show_progress=False,
        )
        m = result.metrics
        assert m["eval_loss"] < m["base"]["eval_loss"] - 1.0, (method, m["eval_loss"], m["base"])


# --- the quality bar on real weights ------------------------------------------------------------

QUALITY_DIR = REPO / "examples" / "data" / "reviews"


@pytest.mark.slow
def test_minilm_lora_quality_bar(registry, tmp_path):
    """Default settings, ~50 reviews, ~25 held-out reviews by another writer: ≥ 0.85 accuracy
    (the time it takes is printed; speed belongs in benchmarks)."""
    train, held = QUALITY_DIR / "quality_train.jsonl", QUALITY_DIR / "quality_heldout.jsonl"
    if not (train.is_file() and held.is_file()):
        train = write_jsonl(tmp_path / "quality_train.jsonl", REVIEWS_TRAIN)
        held = write_jsonl(tmp_path / "quality_heldout.jsonl", REVIEWS_HELDOUT)
    started = time.perf_counter()
    result = train_adapter(
        TrainConfig(base="minilm", name="reviews", data=str(train), eval_data=str(held)),
        registry=registry,
        show_progress=False,
    )
    wall = time.perf_counter() - started
    print(
        f"quality bar: accuracy {result.metrics['accuracy']:.3f} "
        f"(base {result.metrics['base']['accuracy']:.3f}), {wall:.1f}s"
    )
    assert result.metrics["accuracy"] >= 0.85


@pytest.mark.slow
def test_tinylm_learns_a_task_its_base_cannot_do(registry):
    """The built-in generation base: with default settings (one seed; the quality suite runs
    five), a LoRA adapter on the shout rows writes held-out answers exactly, and the base alone
    does not."""
    data = REPO / "examples" / "data" / "shout"
    result = train_adapter(
        TrainConfig(
            base="tinylm",
            name="shout",
            data=str(data / "train.jsonl"),
            eval_data=str(data / "eval.jsonl"),
            keep="last",
        ),  # fmt: skip
        registry=registry,
        show_progress=False,
    )
    print(f"tinylm shout: exact match {result.metrics['exact_match']:.3f} "
          f"(base {result.metrics['base']['exact_match']:.3f})")  # fmt: skip
    assert result.metrics["base"]["exact_match"] <= 0.1
    assert result.metrics["exact_match"] >= 0.8


_TRAIN = [
    ("Great product, works exactly as described.", "positive"),
    ("Terrible quality, it broke after a week.", "negative"),
    ("I love this lamp, the light is warm and soft.", "positive"),
    ("The battery died on the first day.", "negative"),
    ("Fast shipping and the box was well packed.", "positive"),
    ("It arrived late and the box was crushed.", "negative"),
    ("Very comfortable shoes, I wear them every day.", "positive"),
    ("The shoes fell apart after two walks.", "negative"),
    ("Excellent sound, the speaker is loud and clear.", "positive"),
    ("The speaker crackles and the sound is awful.", "negative"),
    ("Best coffee maker I have ever owned.", "positive"),
    ("The coffee maker leaks all over the counter.", "negative"),
    ("Easy to set up and the app works well.", "positive"),
    ("The app crashes every time I open it.", "negative"),
    ("Beautiful color and the fabric feels soft.", "positive"),
    ("The color faded after one wash.", "negative"),
    ("Good value for the money, I would buy it again.", "positive"),
    ("Waste of money, do not buy this.", "negative"),
    ("The screen is bright and sharp.", "positive"),
    ("The screen cracked when I opened the package.", "negative"),
    ("My kids love this toy, hours of fun.", "positive"),
    ("The toy stopped working the next morning.", "negative"),
    ("Solid build, feels sturdy and well made.", "positive"),
    ("Cheap plastic, it feels flimsy and weak.", "negative"),
    ("Customer service was friendly and helpful.", "positive"),
    ("Customer service never answered my emails.", "negative"),
    ("The blender is powerful and quiet.", "positive"),
    ("The blender is so loud and it smells burnt.", "negative"),
    ("Perfect fit, the jacket keeps me warm.", "positive"),
    ("The jacket is too small and the zipper broke.", "negative"),
    ("Works great, no complaints at all.", "positive"),
    ("Does not work, I want a refund.", "negative"),
    ("The knife is very sharp and easy to clean.", "positive"),
    ("The knife was dull and rusty out of the box.", "negative"),
    ("Amazing battery life, lasts all week.", "positive"),
    ("The charger overheats and stopped charging.", "negative"),
    ("I am very happy with this purchase.", "positive"),
    ("I am very disappointed with this purchase.", "negative"),
    ("Lovely gift, my mother was delighted.", "positive"),
    ("Missing parts and the instructions were useless.", "negative"),
    ("The chair is comfortable and easy to assemble.", "positive"),
    ("The chair wobbles and one leg is bent.", "negative"),
    ("Highly recommend, five stars.", "positive"),
    ("One star, returned it the same day.", "negative"),
    ("The tea tastes fresh and smells wonderful.", "positive"),
    ("The tea tastes stale and bitter.", "negative"),
    ("Nice design and it works perfectly.", "positive"),
    ("Poor design, the lid never closes.", "negative"),
    ("The headphones are light and sound fantastic.", "positive"),
    ("The headphones hurt my ears and the cable snapped.", "negative"),
]
_HELD = [
    ("Honestly blown away, this vacuum picks up everything.", "positive"),
    ("Total junk. Stopped charging within three days.", "negative"),
    ("Super cozy blanket, I nap under it daily.", "positive"),
    ("The handle snapped off the first time I used it.", "negative"),
    ("Arrived early and looks even better than the photos.", "positive"),
    ("Smells like chemicals and gave me a headache.", "negative"),
    ("My dog adores this bed, he sleeps in it all night.", "positive"),
    ("Paint started peeling within a week, very poor.", "negative"),
    ("Crisp picture and the remote is simple to use.", "positive"),
    ("Sent the wrong size and nobody replied to my complaint.", "negative"),
    ("Delicious snacks, the whole family enjoyed them.", "positive"),
    ("The zipper jammed immediately, useless bag.", "negative"),
    ("Wonderful quality for such a low price.", "positive"),
    ("Overpriced and it feels like a cheap toy.", "negative"),
    ("Keeps my drinks cold for hours, brilliant bottle.", "positive"),
    ("The bottle leaks and ruined my books.", "negative"),
    ("Setup took two minutes and it runs smoothly.", "positive"),
    ("Keeps disconnecting from wifi, so frustrating.", "negative"),
    ("Really pleased, it exceeded my expectations.", "positive"),
    ("Broken on arrival and the seller ignored me.", "negative"),
    ("These socks are soft and warm, love them.", "positive"),
    ("The stitching came loose after one day.", "negative"),
    ("Gorgeous mug, my coffee stays hot longer.", "positive"),
    ("Awful experience, I regret buying it.", "negative"),
    ("A fantastic little gadget that I use every day.", "positive"),
]
# Used until examples/data/reviews/quality_*.jsonl exist. The held-out reviews were written
# separately, in another voice, with few words shared with the training rows.
REVIEWS_TRAIN = [{"text": t, "label": lab} for t, lab in _TRAIN]
REVIEWS_HELDOUT = [{"text": t, "label": lab} for t, lab in _HELD]
