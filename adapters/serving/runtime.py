"""The hot-swap runtime: one base model loaded once, a bounded LRU of resident adapters, and
batches where every row runs with its own adapter (LoRA, prefix tuning or the plain base).

How rows with different adapters share one forward pass:

* LoRA. Resident LoRA adapters live in one `LoraBank` (adapters/serving/lora_bank.py): per adapted
  layer, every adapter's A and scaled B stacked in two tensors, applied by a forward hook with a
  per-row gather and two batched matmuls (the quantized base layers stay as they are). Each
  forward runs inside `bank.rows(...)`, which says which adapter each row uses; a row whose
  adapter is not in the bank is an error, never a silent fall-back to the base.
* Prefix tuning. At load time the adapter's saved prompt embeddings become per-layer key/value
  prefix tensors, kept as they are. A batch's KV cache starts with `P = max(num_virtual_tokens)`
  slots per row: a prefix row puts its prefix in the last slots of that region, every other slot
  is masked out. Prefix rows run with no LoRA. Token positions are `num_virtual_tokens + i`
  (0-based i), what PEFT's own prefix forward gives (transformers numbers positions from the
  cache length, and the prefix keys carry no rotary), so outputs match PEFT's.
* Left padding. Tokens are left-padded after the prefix region; every forward receives an
  explicit 4D mask (causal, minus padding and empty prefix slots) and explicit position ids, so
  transformers' packed-sequence heuristics never see padded position ids.

Decoding is our own loop with a KV cache (`DecodeBatch`): greedy or temperature/top-p sampling
with a per-row seeded generator, stop sequences, max_new_tokens, per-row finish. Rows can join
(`add`, prefilled separately and merged into the cache) and leave (`drop`) between decode steps,
which is what the server's scheduler uses for continuous batching.

Classification runs the shared encoder with per-row LoRA and then each row's own head (its
classifier, and pooler if saved, from the adapter's safetensors), so adapters with different
label counts share a batch.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptory.adapters.bases.loading import BUILTIN_BASES, LoadedBase, check_fingerprint, load_base
from adaptory.adapters.bases.numerics import resolve_numerics
from adaptory.adapters.serving.decode import (
    BASE,
    DECODE_MODES,
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
)
from adaptory.registry.errors import AdaptoryError, BadInput, ConfigError, InvalidAdapter

__all__ = ["BASE", "AdapterInUse", "GenerationRequest", "GenerationResult", "Runtime"]
MAX_AUTO_BATCH = 256  # rows; like vLLM's default max_num_seqs
SERVABLE = {"causal-lm": ("lora", "prefix"), "seq-cls": ("lora",)}
# LoRA options whose math the mixed-batch layers do not implement; refused at load, not ignored.
_UNSUPPORTED_LORA = (
    "use_dora", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "fan_in_fan_out",
)  # fmt: skip
_PLACEHOLDER_LABELS = ["LABEL_0", "LABEL_1"]  # the shared seq-cls base's own head is never used


class AdapterInUse(BadInput):
    """An adapter cannot be unloaded while rows of a running batch use it."""


# --- resident adapters ---------------------------------------------------------------------


@dataclass
class ResidentAdapter:
    """An adapter held in memory: its LoRA weights per module, or its KV prefix, plus a head."""

    key: str  # "name:version"
    entry: Any
    method: str
    in_bank: bool = False  # its LoRA weights are in the runtime's LoraBank
    prefix: list[tuple[Any, Any]] | None = None  # per layer (keys, values): (heads, P, head_dim)
    head: dict[str, Any] = field(default_factory=dict)  # seq-cls: classifier.* / pooler.* tensors
    labels: list[str] | None = None
    pins: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prefix is None else int(self.prefix[0][0].shape[1])


def _strip_key(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.modules_to_save\.[^.]+", "", key)


# --- the runtime ---------------------------------------------------------------------------


class Runtime:
    """One base loaded once plus an LRU of up to `max_adapters` resident registry adapters."""

    def __init__(
        self,
        base_ref: str,
        *,
        registry,
        task: str | None = None,
        quant: str = "nf4",
        device: str | None = None,
        max_adapters: int = 8,
        force: bool = False,
        loaded_base: LoadedBase | None = None,
        numerics: str = "auto",
        decode: str = "auto",
    ) -> None:
        if max_adapters < 1:
            raise ConfigError("max_adapters must be at least 1")
        if decode not in DECODE_MODES:
            raise ConfigError(
                f"unknown decode mode '{decode}'", hint=f"choose one of {DECODE_MODES}"
            )
        self.decode_mode = decode
        self.base_ref = base_ref
        self.registry = registry
        self.max_adapters = max_adapters
        self.force = force
        if task is None:
            task = (
                BUILTIN_BASES[base_ref].default_task if base_ref in BUILTIN_BASES else "causal-lm"
            )
        labels = _PLACEHOLDER_LABELS if task == "seq-cls" else None
        device = device or (loaded_base.device if loaded_base else None)
        self.numerics = resolve_numerics(numerics, device)
        self.base: LoadedBase = loaded_base or load_base(
            base_ref,
            task=task,
            quant=quant,
            device=device,
            labels=labels,
            home=registry.home,
            dtype=self.numerics.dtype_name,
        )
        self.numerics.apply()
        self.task = self.base.task
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.lock = threading.RLock()
        self._tok_lock = threading.Lock()
        from adaptory.adapters.serving.lora_bank import (
            LoraBank,  # imports torch: kept out of module import
        )

        self._bank = LoraBank(self.model)
        self._bank.reserve(max_adapters)  # exact room for the LRU bound: no reallocation later
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self.counters = {"base_loads": 1, "loads": 0, "evictions": 0, "hits": 0, "load_failures": 0}
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self._generator_batch: DecodeBatch | None = None  # reused by generate()
        if self.task == "causal-lm":
            decoder = inspect.signature(self.model.base_model.forward).parameters
            # transformers 5.2x calls it `cache`; earlier 5.x `past_key_values`
            self._decoder_cache_kwarg = "cache" if "cache" in decoder else "past_key_values"

    # -- adapters ---------------------------------------------------------------------------

    def resident(self) -> list[str]:
        """Resident adapter keys, least recently used first."""
        with self.lock:
            return list(self._resident)

    def stats(self) -> dict:
        with self.lock:
            return {**self.counters, "resident": len(self._resident)}

    def resolve(self, ref: str):
        """The registry entry for `ref`, checked to be servable on this base (task, method)."""
        return self.check_servable(self.registry.resolve(ref))

    def check_servable(self, entry):
        if entry.task and entry.task != self.task:
            raise ConfigError(
                f"{entry.ref} is a {entry.task} adapter; this base serves {self.task}",
                hint="serve it from a base loaded for its task",
            )
        if entry.method not in SERVABLE[self.task]:
            raise ConfigError(
                f"{entry.ref}: method '{entry.method}' cannot be served for {self.task}",
                hint=f"servable methods: {', '.join(SERVABLE[self.task])}",
            )
        return entry

    def load(self, ref, *, pin: bool = False, count_hit: bool = True) -> ResidentAdapter:
        """Make an adapter resident (a hit if it already is); evict the LRU ones beyond the bound.

        With `pin`, the adapter is pinned before anything is evicted, so a load under pressure
        (every other resident adapter pinned by running rows) can never evict itself: the
        resident set then exceeds the bound until those rows finish.
        """
        entry = self.check_servable(ref) if hasattr(ref, "digest") else self.resolve(ref)
        with self.lock:
            adapter = self._resident.get(entry.ref)
            if adapter is not None:
                self._resident.move_to_end(entry.ref)
                self.counters["hits"] += count_hit
            else:
                try:
                    adapter = self._read_adapter(entry)
                except Exception:
                    self.counters["load_failures"] += 1
                    if entry.ref in self._bank.slots:  # a failed load leaves nothing behind
                        self._bank.remove(entry.ref)
                    raise
                self._resident[adapter.key] = adapter
                self.counters["loads"] += 1
            if pin:
                adapter.pins += 1
            self._evict_beyond(self.max_adapters)
            return adapter

    def unload(self, ref: str) -> bool:
        """Evict an adapter now; False if it was not resident."""
        with self.lock:
            key = ref if ref in self._resident else None
            if key is None:
                try:
                    key = self.registry.resolve(ref).ref
                except AdaptoryError:
                    return False
            adapter = self._resident.get(key)
            if adapter is None:
                return False
            if adapter.pins:
                raise AdapterInUse(f"{key} is in use by a running batch; try again shortly")
            self._evict(key)
            return True

    def _evict_beyond(self, limit: int) -> None:
        for key in [k for k, a in self._resident.items() if not a.pins]:
            if len(self._resident) <= limit:
                break
            self._evict(key)

    def _evict(self, key: str) -> None:
        adapter = self._resident.pop(key)
        if adapter.in_bank:
            self._bank.remove(key)
            adapter.in_bank = False
        adapter.prefix = None
        adapter.head.clear()
        self.counters["evictions"] += 1

    def _read_adapter(self, entry) -> ResidentAdapter:
        """Read a stored adapter, checked as `import` checks it (entries stored before a check
        existed), then against this base; every refusal is a domain error naming the entry."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from adaptory.registry.adapter_files import WEIGHTS_FILE, validate_adapter_folder

        check_fingerprint(
            entry.base_fingerprint,
            self.base.fingerprint,
            what=f"adapter {entry.ref}",
            force=self.force,
        )
        folder = Path(self.registry.files(entry, verify=True))
        try:
            config = validate_adapter_folder(folder).config
        except InvalidAdapter as exc:
            raise InvalidAdapter(f"{entry.ref}: {exc.message}", hint=exc.hint) from None
        method = entry.method or "lora"
        expected_type = {"lora": "LORA", "prefix": "PREFIX_TUNING"}.get(method)
        if config["peft_type"] != expected_type:
            raise ConfigError(
                f"{entry.ref} is catalogued as {method} but its files hold {config['peft_type']}"
            )
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE), device=str(self.base.device))
        except SafetensorError as exc:
            raise InvalidAdapter(f"{entry.ref}: {WEIGHTS_FILE} cannot be loaded ({exc})") from None
        adapter = ResidentAdapter(key=entry.ref, entry=entry, method=method)
        if adapter.method == "prefix":
            adapter.prefix = self._prefix_kv(entry, config, tensors)
            return adapter
        for option in _UNSUPPORTED_LORA:
            if config.get(option):
                raise ConfigError(f"{entry.ref}: LoRA option '{option}' is not servable here")
        if config.get("bias", "none") != "none":
            raise ConfigError(f"{entry.ref}: LoRA bias='{config['bias']}' is not servable here")
        lora: dict[str, Any] = {}
        for key, tensor in tensors.items():
            name = _strip_key(key)
            if re.search(r"\.lora_[AB](?:\.[^.]+)?\.weight$", name):
                lora[key] = tensor
            elif ".lora_" in name:
                raise ConfigError(f"{entry.ref}: tensor {key!r} is not a linear LoRA weight")
            elif self.task == "seq-cls":
                name = name.removeprefix(f"{self.model.base_model_prefix}.")
                adapter.head[name] = tensor.to(torch.float32)
            else:
                raise ConfigError(
                    f"{entry.ref}: saves full module weights ({key!r}); only LoRA weights are "
                    "servable"
                )
        if not lora:
            raise ConfigError(f"{entry.ref}: no LoRA weights found")
        if self.task == "seq-cls":
            if not any(k.startswith(("classifier.", "score.")) for k in adapter.head):
                raise ConfigError(f"{entry.ref}: no classification head in the adapter's weights")
            labels = (entry.extra or {}).get("labels")
            width = _head_width(adapter.head)
            adapter.labels = list(labels) if labels else [f"LABEL_{i}" for i in range(width)]
            if len(adapter.labels) != width:
                raise ConfigError(
                    f"{entry.ref}: {len(adapter.labels)} labels for a {width}-way head"
                )
        try:  # checks every shape against the base before it changes anything
            self._bank.add(adapter.key, lora, config)
        except ConfigError as exc:
            raise ConfigError(f"{entry.ref}: {exc.message}", hint=exc.hint) from None
        adapter.in_bank = True
        return adapter

    def _prefix_kv(self, entry, config: dict, tensors: dict) -> list[tuple[Any, Any]]:
        """Per-layer (keys, values) from PEFT's saved prompt embeddings (the encoder's output).

        `config` and the tensor's shape were checked against each other by the registry's
        validation; what is checked here is the fit with this base: layers, key/value heads and
        head size (PEFT sizes a prefix by the base's key/value heads), and room in its context.
        """
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError(f"{entry.ref}: encoder-decoder prefix tuning is not servable")
        weight = tensors.get("prompt_embeddings")
        nvt, layers = config["num_virtual_tokens"], config["num_layers"]
        heads, dim = config["num_attention_heads"], config["token_dim"]
        if weight is None or tuple(weight.shape) != (nvt, layers * 2 * dim):
            raise InvalidAdapter(f"{entry.ref}: prompt_embeddings does not match its config")
        base = self.model.config
        n_layers = base.num_hidden_layers
        kv_heads = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        if layers != n_layers:
            raise ConfigError(f"{entry.ref}: prefix made for {layers} layers, base has {n_layers}")
        if (heads, dim // heads) != (kv_heads, head_dim):
            raise ConfigError(
                f"{entry.ref}: prefix made for {heads} key/value heads of size {dim // heads}; "
                f"this base has {kv_heads} of size {head_dim}",
                hint="the adapter was made for another base",
            )
        if self.max_positions and nvt >= self.max_positions:
            raise ConfigError(
                f"{entry.ref}: a prefix of {nvt} virtual tokens leaves no room in this base's "
                f"context of {self.max_positions} tokens"
            )
        dtype = getattr(self.model, "dtype", weight.dtype)
        kv = weight.to(dtype).view(nvt, layers * 2, heads, dim // heads).permute(1, 2, 0, 3)
        return [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(layers)]

    def _acquire(self, ref: str | None) -> tuple[str, ResidentAdapter | None]:
        if ref is None or ref == BASE:
            return BASE, None
        adapter = self.load(ref, pin=True)
        return adapter.key, adapter

    def _release(self, adapter: ResidentAdapter | None) -> None:
        if adapter is not None:
            with self.lock:
                adapter.pins -= 1
                self._evict_beyond(self.max_adapters)

    def _rows(self, keys: list[str]):
        """The LoRA bank's routing for a forward whose row i runs adapter keys[i]."""
        return self._bank.rows([key if key in self._bank.slots else None for key in keys])

    def _bank_rows(self, slots, *, static: bool = False, reuse: object = None):
        """The LoRA bank's routing from a device tensor of bank slots, one per row."""
        return self._bank.rows_from(slots, static=static, reuse=reuse)

    def _bank_slot(self, key: str) -> int:
        """The bank slot of a row for adapter `key` (0: the plain base, or a prefix adapter)."""
        return self._bank.slot_of(key if key in self._bank.slots else None)

    def max_batch(self, max_seq_len: int, *, budget_bytes: int | None = None) -> int:
        """How many rows of `max_seq_len` positions a KV cache fits in: `budget_bytes`, or by
        default half the free GPU memory (a quarter of free RAM on the CPU), at most 256."""
        from adaptory.adapters.serving.kv_cache import KVShape

        dtype = self.model.get_input_embeddings().weight.dtype
        per_row = KVShape.of(self.model.config, dtype).bytes_per_token * max_seq_len
        if budget_bytes is None:
            budget_bytes = self.numerics.kv_budget_bytes(self.base.device)
        return max(1, min(MAX_AUTO_BATCH, budget_bytes // per_row))

    def new_batch(self, *, slots: int = 8, length: int | None = None, **kwargs) -> DecodeBatch:
        """An empty decode batch on this runtime (the scheduler keeps one for its lifetime)."""
        return DecodeBatch(self, slots=slots, length=length, **kwargs)

    # -- text -------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render chat messages with the tokenizer's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"base {self.base_ref} has no chat template")
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (special tokens added unless it was rendered by a chat template)."""
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        if request.messages is not None:
            return self.encode(self.chat_prompt(request.messages), chat=True)
        return self.encode(request.prompt or "")

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        requests: Iterable[GenerationRequest],
        *,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[GenerationResult]:
        """Run all requests as one mixed batch to completion; results in request order.

        A row that fails alone (non-finite logits from a broken adapter) lets the others finish,
        then its error is raised.
        """
        requests = list(requests)
        with self.lock:
            batch, self._generator_batch = self._generator_batch, None
        if batch is None:
            batch = DecodeBatch(self, slots=max(1, len(requests)))
        items = [
            (request, (lambda text, i=i: on_text(i, text)) if on_text else None)
            for i, request in enumerate(requests)
        ]
        try:
            handles = batch.add_many(items) if items else []  # one prefill for all of them
            while batch.active:
                batch.step()
        finally:
            if batch.active:
                batch.drop(list(batch.rows), reason="error")
            self._generator_batch = batch  # its buffers (and captured graphs) serve the next call
        for handle in handles:
            if handle.error is not None:
                raise handle.error
        return [h.result for h in handles]

    # -- classification ---------------------------------------------------------------------

    def classify(self, ref: str, texts: list[str]) -> list[dict]:
        """Labels and scores of each text under one adapter."""
        return self.classify_mixed([(ref, t) for t in texts])

    def classify_max_length(self) -> int:
        """Longest input the encoder takes, in tokens; longer texts are truncated to it.

        The tokenizer's `model_max_length` can exceed the model's position table (a small
        encoder saved with its parent's tokenizer), so the table caps it too.
        """
        limit = int(min(self.tokenizer.model_max_length, 1 << 20))
        positions = self.max_positions
        if positions:
            embeddings = getattr(self.model.base_model, "embeddings", None)
            # RoBERTa-style embeddings number positions from padding_idx + 1
            offset = getattr(embeddings, "padding_idx", None)
            limit = min(limit, positions - (offset + 1 if offset is not None else 0))
        return limit

    def classify_lengths(self, texts: list[str]) -> list[int]:
        """Each text's token count as classified (special tokens in, truncated)."""
        with self._tok_lock:
            ids = self.tokenizer(texts, truncation=True, max_length=self.classify_max_length())
        return [len(row) for row in ids["input_ids"]]

    def classify_mixed(self, rows: list[tuple[str, str]]) -> list[dict]:
        """One encoder pass for (adapter ref, text) rows with different adapters and heads."""
        import torch

        if self.task != "seq-cls":
            raise ConfigError(f"base {self.base_ref} is a {self.task} base, not a classifier")
        if not rows:
            return []
        acquired = []
        try:
            with self.lock:
                for ref, _ in rows:
                    acquired.append(self._acquire(ref))
                limit = self.classify_max_length()
                with self._tok_lock:
                    enc = self.tokenizer(
                        [t for _, t in rows],
                        padding=True,
                        truncation=True,
                        max_length=limit,
                        return_tensors="pt",
                    )
                enc = {k: v.to(self.base.device) for k, v in enc.items()}
                with torch.inference_mode(), self._rows([key for key, _ in acquired]):
                    encoder = self.model.base_model
                    out = encoder(**enc)
                results = []
                for i, (_key, adapter) in enumerate(acquired):
                    logits = _apply_head(adapter.head, out, i, encoder)
                    probs = torch.softmax(logits.float(), dim=-1).tolist()
                    scores = dict(zip(adapter.labels, probs, strict=True))
                    best = max(range(len(probs)), key=probs.__getitem__)
                    results.append({"label": adapter.labels[best], "scores": scores})
                return results
        finally:
            for _key, adapter in acquired:
                self._release(adapter)


def _head_width(head: dict) -> int:
    for name in ("classifier.weight", "classifier.out_proj.weight", "score.weight"):
        if name in head:
            return int(head[name].shape[0])
    raise ConfigError("unrecognised classification head")


def _apply_head(head: dict, out, row: int, encoder):
    """Logits of one row: BERT-style (pooler + classifier) or RoBERTa-style (dense + out_proj)."""
    import torch
    import torch.nn.functional as F

    hidden = out[0][row : row + 1]  # (1, seq, hidden)
    if "classifier.out_proj.weight" in head:
        x = hidden[:, 0].float()
        x = torch.tanh(
            F.linear(x, head["classifier.dense.weight"], head.get("classifier.dense.bias"))
        )
        return F.linear(
            x, head["classifier.out_proj.weight"], head.get("classifier.out_proj.bias")
        )[0]
    if "classifier.weight" in head:
        if "pooler.dense.weight" in head:
            pooled = torch.tanh(
                F.linear(
                    hidden[:, 0].float(), head["pooler.dense.weight"], head.get("pooler.dense.bias")
                )
            )
        elif len(out) > 1 and out[1] is not None:
            pooled = out[1][row : row + 1].float()
        else:
            pooled = hidden[:, 0].float()
        return F.linear(pooled, head["classifier.weight"], head.get("classifier.bias"))[0]
    raise ConfigError("unrecognised classification head (expected classifier.* weights)")
