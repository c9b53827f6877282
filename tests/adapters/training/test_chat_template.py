"""`--chat-template NAME|FILE`: chat data rendered with a chosen template, the template stored
with the adapter, and serving and evaluation rendering that adapter's chats with it."""

from __future__ import annotations

import json

import pytest

from adaptory.adapters.serving.runtime import GenerationRequest, Runtime
from adaptory.adapters.training.data import CHAT_TEMPLATES, IGNORE, load_dataset
from adaptory.adapters.training.loop import TrainConfig, train_adapter
from adaptory.registry import Registry
from adaptory.registry.errors import ConfigError

CHATS = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
    for w in ["red", "blue", "green", "gold", "pink", "grey"]
]
ASK = [{"role": "user", "content": "say red"}]
# ChatML written out by hand: the oracle for what the named template renders.
CHATML_ASK = "<|im_start|>user\nsay red<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("chat-template")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    registry = Registry(root / "home")
    config = TrainConfig(base=str(tiny_llama_dir), data=str(data), name="chat", max_steps=2,
                         eval_split=0, chat_template="chatml", batch_size=2)  # fmt: skip
    result = train_adapter(config, registry=registry, show_progress=False)
    return registry, result.entry, data


def test_the_template_is_stored_with_the_adapter(trained):
    registry, entry, _ = trained
    folder = registry.files(entry)
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    assert entry.training_config["chat_template"] == "chatml"
    assert (folder / "adapter_config.json").is_file()  # still a plain PEFT folder
    from adaptory.adapters.training.evaluate import load_adapter_model

    _, base, _ = load_adapter_model(registry, entry.ref)  # what `adaptory eval` renders with
    assert base.tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True) \
        == CHATML_ASK  # fmt: skip


def test_serving_renders_the_adapters_chats_with_it(trained, tiny_llama_dir):
    registry, entry, _ = trained
    runtime = Runtime(str(tiny_llama_dir), registry=registry, max_adapters=2)
    assert runtime.render_chat(ASK, adapter=entry.ref) == CHATML_ASK
    base_render = runtime.render_chat(ASK)  # the base's own template, for the base's rows
    assert base_render != CHATML_ASK and "<|im_start|>" not in base_render
    request = GenerationRequest(messages=ASK, adapter=entry.ref, max_new_tokens=2)
    assert runtime.prompt_ids(request) == runtime.encode(CHATML_ASK, chat=True)


def test_only_the_assistant_reply_and_its_end_marker_are_trained(tiny_llama_dir, tmp_path):
    from adaptory.adapters.bases.loading import load_tokenizer

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n")
    tokenizer = load_tokenizer(tiny_llama_dir, "causal-lm")
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    ds = load_dataset(data, tokenizer=tokenizer, task="causal-lm", fmt="chat", max_length=128)
    ids, labels = ds.examples[0].input_ids, ds.examples[0].labels
    assert tokenizer.decode(ids) == "<|im_start|>user\nsay red<|im_end|>\n" \
        "<|im_start|>assistant\nred<|im_end|>\n"  # fmt: skip
    trained_ids = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(trained_ids) == "red<|im_end|>\n"


def test_a_template_file_and_bad_values(tmp_path, trained):
    _, _, data = trained
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    config = TrainConfig(base="tinylm", data=str(data), name="x", chat_template=str(good))
    assert config.chat_template == str(good)
    with pytest.raises(ConfigError, match="neither a known name nor a file") as err:
        TrainConfig(base="tinylm", data=str(data), name="x", chat_template="chatmll")
    assert "chatml" in err.value.hint
    bad = tmp_path / "bad.jinja"
    bad.write_text("hello")
    with pytest.raises(ConfigError, match="never reads `messages`"):
        TrainConfig(base="tinylm", data=str(data), name="x", chat_template=str(bad))
    toml = tmp_path / "run.toml"  # a file named in TOML is relative to the TOML file
    toml.write_text(f'base = "tinylm"\ndata = "{data}"\nname = "x"\nchat_template = "mine.jinja"\n')
    assert TrainConfig.from_toml(toml).chat_template == str(good.resolve())
