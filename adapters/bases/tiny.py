"""Small Llama-style bases built from scratch: a byte-level BPE tokenizer trained on local text
and a randomly initialised model of a named size. No network at any step.

`adaptory base init` saves such a base untrained; `adaptory base pretrain` (adapters.pretrain)
then trains it on a corpus so there is a real base to adapt.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from adaptory.adapters.bases.shapes import SIZES as ALL_SIZES
from adaptory.adapters.bases.shapes import Size, count_params, llama_config
from adaptory.registry.errors import ConfigError

# the shipped corpus, found as package data wherever the package lives
DEFAULT_CORPUS = Path(str(importlib.resources.files("adaptory.adapters.assets") / "corpus.txt"))

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Turns are delimited by plain-text role markers and the eos token, so loss masking can find the
# assistant spans by rendering the conversation prefix by prefix.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# The sizes `adaptory base init` builds on the CPU and saves; 1b and 8b are built in place only.
SIZES: dict[str, Size] = {name: size for name, size in ALL_SIZES.items() if size.saved}
ARCHS = ("llama",)


def read_corpus(files: Iterable[Path]) -> list[str]:
    texts = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"corpus file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="strict")
        if not text.strip():
            raise ConfigError(f"corpus file {path} is empty")
        texts.append(text)
    return texts


def corpus_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`; every byte sequence stays encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(size: str, vocab_size: int, tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(SIZES[size], vocab=vocab_size, tokenizer=tokenizer)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_base(model, tokenizer, out: Path, info: dict) -> Path:
    """Write the base atomically (temp folder + rename): a crash leaves no half-written base."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "adaptory_base.json").write_text(json.dumps(info, indent=2) + "\n")
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors make them owner-only
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_base(
    out: Path,
    *,
    arch: str = "llama",
    size: str = "tiny",
    corpus: list[Path] | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    description: str = "",
    texts: list[str] | None = None,
):
    """Build an untrained base (tokenizer trained on `corpus`, or on `texts` made from it) and
    save it to `out`.

    Returns (model, tokenizer, info) so `pretrain` can continue without reloading.
    """
    from adaptory.adapters.bases.loading import quiet_transformers

    quiet_transformers()
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture '{arch}'", hint=f"choose one of {ARCHS}")
    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}'", hint=f"choose one of {', '.join(SIZES)}")
    files = list(corpus) if corpus else [DEFAULT_CORPUS]
    texts = texts if texts is not None else read_corpus(files)
    vocab = vocab_size or SIZES[size].vocab
    tokenizer = build_tokenizer(texts, vocab)
    model = build_model(size, len(tokenizer), tokenizer, seed=seed)
    info = {
        "arch": arch,
        "size": size,
        "params": count_params(model),
        "vocab_size": len(tokenizer),
        "seed": seed,
        # the shipped corpus by name (its path is wherever Adaptory is installed)
        "corpus": ["adaptory:corpus.txt" if Path(f) == DEFAULT_CORPUS else str(f) for f in files],
        "corpus_digest": corpus_digest(texts),
        "pretrained": False,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "description": description or f"{arch} {size}, untrained (adaptory base init)",
    }
    save_base(model, tokenizer, out, info)
    return model, tokenizer, info
