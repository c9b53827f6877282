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
from adaptory.registry.errors import AdaptoryError, BadInput, ConfigError, InvalidAdapter

BASE = "__base__"  # the routing key of rows that run on the plain base
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


# --- generation types ----------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """One completion: a prompt (or chat messages, or token ids) for an adapter (None = base)."""

    prompt: str | None = None
    adapter: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None  # the resolved reference, name:version


@dataclass
class _Row:
    request: GenerationRequest
    key: str  # adapter key or BASE
    adapter: ResidentAdapter | None
    prompt_ids: list[int]
    generator: Any
    on_text: Callable[[str], None] | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    sampled: int = 0
    finish_reason: str | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None  # why this row alone ended early (finish_reason "error")
    logits: list = field(default_factory=list)  # per step, when the batch keeps them


def _holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop sequence (or a split char)."""
    keep = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


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
    ) -> None:
        if max_adapters < 1:
            raise ConfigError("max_adapters must be at least 1")
        self.base_ref = base_ref
        self.registry = registry
        self.max_adapters = max_adapters
        self.force = force
        if task is None:
            task = (
                BUILTIN_BASES[base_ref].default_task if base_ref in BUILTIN_BASES else "causal-lm"
            )
        labels = _PLACEHOLDER_LABELS if task == "seq-cls" else None
        self.base: LoadedBase = loaded_base or load_base(
            base_ref, task=task, quant=quant, device=device, labels=labels, home=registry.home
        )
        self.task = self.base.task
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.lock = threading.RLock()
        self._tok_lock = threading.Lock()
        from adaptory.adapters.serving.lora_bank import (
            LoraBank,  # imports torch: kept out of module import
        )

        self._bank = LoraBank(self.model)
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self.counters = {"base_loads": 1, "loads": 0, "evictions": 0, "hits": 0, "load_failures": 0}
        forward = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None)

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
        batch = DecodeBatch(self)
        handles = []
        for i, request in enumerate(requests):
            callback = (lambda text, i=i: on_text(i, text)) if on_text else None
            handles.append(batch.add(request, on_text=callback))
        while batch.active:
            batch.step()
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


# --- the decode loop -----------------------------------------------------------------------


class DecodeBatch:
    """Rows decoding together over one KV cache; rows join (`add`) and leave between steps.

    Layout of the cache along the sequence axis, per row: [masked slots][prefix][prompt][new
    tokens]; `valid` marks real slots, `positions` is each row's next position id.
    """

    def __init__(self, runtime: Runtime, *, keep_logits: bool = False) -> None:
        self.rt = runtime
        self.keep_logits = keep_logits  # tests and benchmarks compare these with references
        self.rows: list[_Row] = []
        self.cache = None  # a transformers DynamicCache, (B, heads, T, head_dim) per layer
        self.valid = None  # (B, T) bool
        self.positions = None  # (B,) long
        self.last = None  # (B,) long: the token to feed next

    @property
    def active(self) -> int:
        return len(self.rows)

    def add(self, request: GenerationRequest, *, on_text=None) -> _Row:
        """Prefill one request into the batch (loads its adapter if needed)."""
        return self.add_many([(request, on_text)])[0]

    def add_many(self, items: list[tuple[GenerationRequest, Any]]) -> list[_Row]:
        """Prefill several requests in one forward pass and merge them into the running batch.

        All or nothing: if it raises, no row joined the batch and no text was emitted, so the
        caller may retry the requests one by one. A row that fails on its own (non-finite
        logits) joins and ends at once with `error` set; the others are unaffected.
        """
        import torch

        rt = self.rt
        if rt.task != "causal-lm":
            raise ConfigError(f"base {rt.base_ref} is a {rt.task} base; it cannot generate")
        rows: list[_Row] = []
        try:
            for request, on_text in items:
                if request.max_new_tokens < 1:
                    raise BadInput("max_new_tokens must be at least 1")
                ids = rt.prompt_ids(request)
                if not ids:
                    raise BadInput("the prompt is empty")
                key, adapter = rt._acquire(request.adapter)
                generator = torch.Generator()
                generator.manual_seed(
                    request.seed if request.seed is not None else torch.seed() % 2**63
                )
                rows.append(_Row(request, key, adapter, ids, generator, on_text))
                if rt.max_positions:
                    need = len(ids) + (adapter.num_virtual_tokens if adapter else 0)
                    need += request.max_new_tokens
                    if need > rt.max_positions:
                        raise BadInput(
                            f"prompt ({len(ids)} tokens) plus max_new_tokens "
                            f"({request.max_new_tokens}) exceeds the base's context of "
                            f"{rt.max_positions} tokens"
                        )
        except BaseException:
            for row in rows:
                rt._release(row.adapter)
            raise
        with rt.lock:
            try:
                logits, kv, valid, positions = self._prefill(rows)
                eos = _eos_ids(rt)
            except BaseException:
                for row in rows:
                    rt._release(row.adapter)
                raise
            self._merge(rows, kv, valid, positions)
            # _advance never raises for one row (it ends that row), so nothing is half-added
            self._advance(rows, logits, start=len(self.rows) - len(rows), eos=eos)
        return rows

    def _prefill(self, rows: list[_Row]):
        import torch

        rt, device = self.rt, self.rt.base.device
        n = len(rows)
        prefix_len = max((r.adapter.num_virtual_tokens if r.adapter else 0) for r in rows)
        length = max(len(r.prompt_ids) for r in rows)
        pad = rt.tokenizer.pad_token_id or 0
        input_ids = torch.full((n, length), pad, dtype=torch.long, device=device)
        valid = torch.zeros((n, prefix_len + length), dtype=torch.bool, device=device)
        positions = torch.zeros((n, length), dtype=torch.long, device=device)
        kv = None
        if prefix_len:
            cfg = rt.model.config
            kv = []
            for layer in range(cfg.num_hidden_layers):
                ref = next(
                    r.adapter.prefix[layer][0] for r in rows if r.adapter and r.adapter.prefix
                )
                heads, dim = ref.shape[0], ref.shape[2]
                keys = torch.zeros((n, heads, prefix_len, dim), dtype=ref.dtype, device=device)
                values = torch.zeros_like(keys)
                for i, r in enumerate(rows):
                    if r.adapter is not None and r.adapter.prefix is not None:
                        k, v = r.adapter.prefix[layer]
                        keys[i, :, prefix_len - k.shape[1] :] = k
                        values[i, :, prefix_len - v.shape[1] :] = v
                kv.append((keys, values))
        for i, r in enumerate(rows):
            p = r.adapter.num_virtual_tokens if r.adapter else 0
            ids = r.prompt_ids
            input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            valid[i, prefix_len - p : prefix_len] = True
            valid[i, prefix_len + length - len(ids) :] = True
            positions[i, length - len(ids) :] = torch.arange(p, p + len(ids))
        # Prefix rows run on the plain base (LoRA off): their adapter key routes nowhere.
        keys = [BASE if (r.adapter and r.adapter.prefix is not None) else r.key for r in rows]
        cache = _new_cache(kv)
        logits = self._forward(input_ids, positions, valid, cache, keys, prefix_len)
        return logits, cache, valid, positions[:, -1] + 1

    def _forward(self, input_ids, positions, valid, cache, keys, past_len):
        """One forward over `input_ids` (B, L) after `past_len` cached slots; last-token logits.

        The mask is passed ready-made (B, 1, L, past_len + L) so transformers neither rebuilds
        it from the 2D padding mask nor reads packed sequences into left-padded position ids.
        """
        import torch

        rt = self.rt
        length = input_ids.shape[1]
        total = past_len + length
        q_index = torch.arange(past_len, total, device=input_ids.device)
        k_index = torch.arange(total, device=input_ids.device)
        allowed = (k_index[None, :] <= q_index[:, None])[None] & valid[:, None, :]
        allowed |= (k_index[None, :] == q_index[:, None])[None]  # padded queries see themselves
        if getattr(rt.model.config, "_attn_implementation", "sdpa") == "eager":
            # eager attention adds the mask to the scores; sdpa and others take a boolean mask
            # (a float one would have to match the query dtype, bf16 on GPUs)
            dtype = rt.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
        with torch.inference_mode(), rt._rows(keys):
            out = rt.model(
                input_ids=input_ids,
                attention_mask=mask[:, None],
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{rt._cache_kwarg: cache},
            )
        return out.logits[:, -1].float()

    def _merge(self, rows, cache, valid, positions) -> None:
        import torch

        zeros = torch.zeros(len(rows), dtype=torch.long, device=valid.device)
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.valid, self.positions = list(rows), cache, valid, positions
            self.last = zeros
            return
        a, b = self.valid.shape[1], valid.shape[1]
        width = max(a, b)
        old_kv, old_valid = _left_pad(_kv(self.cache), self.valid, width - a)
        new_kv, new_valid = _left_pad(_kv(cache), valid, width - b)
        # every new tensor first, then assignments only: a failure leaves the batch as it was
        merged = [
            (torch.cat([ok, nk]), torch.cat([ov, nv]))
            for (ok, ov), (nk, nv) in zip(old_kv, new_kv, strict=True)
        ]
        merged_valid = torch.cat([old_valid, new_valid])
        merged_positions = torch.cat([self.positions, positions])
        merged_last = torch.cat([self.last, zeros])
        _set_kv(self.cache, merged)
        self.valid, self.positions, self.last = merged_valid, merged_positions, merged_last
        self.rows.extend(rows)

    def step(self) -> list[_Row]:
        """One decode step for every row; returns the rows that finished (already dropped)."""
        import torch

        if not self.rows:
            return []
        rt = self.rt
        with rt.lock:
            self.valid = torch.cat(
                [
                    self.valid,
                    torch.ones((len(self.rows), 1), dtype=torch.bool, device=self.valid.device),
                ],
                dim=1,
            )
            keys = [
                BASE if (r.adapter and r.adapter.prefix is not None) else r.key for r in self.rows
            ]
            logits = self._forward(
                self.last[:, None], self.positions[:, None], self.valid, self.cache, keys,
                self.valid.shape[1] - 1,
            )  # fmt: skip
            self.positions = self.positions + 1
            return self._advance(self.rows, logits, start=0)

    def _advance(self, rows: list[_Row], logits, start: int, eos=None) -> list[_Row]:
        """Pick each row's next token from `logits` (rows = self.rows[start:]); finish rows.

        A row that cannot go on (non-finite logits, a failing callback) ends alone with `error`
        set and finish_reason "error"; it never stops the other rows.
        """
        rt = self.rt
        eos = _eos_ids(rt) if eos is None else eos
        finished = []
        for i, row in enumerate(rows):
            try:
                if self.keep_logits:
                    row.logits.append(logits[i].clone())
                token = _sample(logits[i], row.request, row.generator)
                self.last[start + i] = token
                row.sampled += 1
                if token in eos:
                    row.finish_reason = "stop"
                else:
                    row.generated.append(token)
                    row.text = rt.decode(row.generated)
                    for stop in row.request.stop:
                        cut = row.text.find(stop) if stop else -1
                        if cut >= 0:
                            row.text = row.text[:cut]
                            row.finish_reason = "stop"
                    if (
                        row.finish_reason is None
                        and len(row.generated) >= row.request.max_new_tokens
                    ):
                        row.finish_reason = "length"
                self._emit(row)
            except Exception as exc:
                row.error, row.finish_reason = self._row_error(row, exc), "error"
            if row.finish_reason is not None:
                finished.append(row)
        if finished:
            self.drop(finished)
        return finished

    def _row_error(self, row: _Row, exc: Exception) -> BaseException:
        if not isinstance(exc, NonFiniteLogits):
            return exc
        where = f"at generated token {row.sampled + 1}"
        if row.adapter is not None:
            return InvalidAdapter(
                f"adapter {row.adapter.key} produced non-finite logits (NaN or infinity) "
                f"{where}; its weights are unusable",
                hint="check the adapter's weights for NaN, infinity or huge values",
            )
        return AdaptoryError(f"base {self.rt.base_ref} produced non-finite logits {where}")

    def _emit(self, row: _Row) -> None:
        end = len(row.text)
        if row.finish_reason is None:
            end -= _holdback(row.text, row.request.stop)
        if end > row.sent:
            delta, row.sent = row.text[row.sent : end], end
            if row.on_text:
                row.on_text(delta)
        if row.finish_reason is not None and row.result is None and row.error is None:
            row.result = GenerationResult(
                text=row.text,
                token_ids=list(row.generated),
                finish_reason=row.finish_reason,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=row.sampled,
                adapter=row.adapter.key if row.adapter else None,
            )

    def drop(self, rows: Iterable[_Row], *, reason: str | None = None) -> None:
        """Remove rows (finished or cancelled) and trim slots no remaining row uses."""
        import torch

        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        for row in self.rows:
            if id(row) in gone:
                if row.finish_reason is None:
                    row.finish_reason = reason or "cancelled"
                self.rt._release(row.adapter)
        if not keep:
            self.rows, self.cache, self.valid, self.positions, self.last = (
                [],
                None,
                None,
                None,
                None,
            )
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        valid = self.valid[index]
        used = valid.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self.valid = valid[:, first:]
        _set_kv(
            self.cache, [(k[index, :, first:], v[index, :, first:]) for k, v in _kv(self.cache)]
        )
        self.positions = self.positions[index]
        self.last = self.last[index]
        self.rows = [self.rows[i] for i in keep]


def _new_cache(kv: list[tuple[Any, Any]] | None):
    from transformers import DynamicCache

    return DynamicCache(kv) if kv else DynamicCache()


def _kv(cache) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _set_kv(cache, kv: list[tuple[Any, Any]]) -> None:
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = k, v


def _left_pad(kv, valid, n: int):
    import torch

    if n == 0:
        return kv, valid
    padded = []
    for k, v in kv:
        zk = torch.zeros((*k.shape[:2], n, k.shape[3]), dtype=k.dtype, device=k.device)
        padded.append((torch.cat([zk, k], dim=2), torch.cat([zk, v], dim=2)))
    zeros = torch.zeros((valid.shape[0], n), dtype=torch.bool, device=valid.device)
    return padded, torch.cat([zeros, valid], dim=1)


def _eos_ids(rt: Runtime) -> set[int]:
    ids = rt.model.generation_config.eos_token_id if rt.model.generation_config else None
    if ids is None:
        ids = rt.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list) else {int(ids)}


class NonFiniteLogits(ValueError):
    """A row's logits (or its temperature-scaled logits) hold NaN or +infinity."""


def _sample(logits, request: GenerationRequest, generator) -> int:
    import torch

    # NaN (and +inf, which softmax turns into NaN) come from broken weights: argmax would pick
    # an arbitrary token and multinomial would fail the whole batch, so the row fails here.
    if request.temperature <= 1e-5:
        if not _usable(logits):
            raise NonFiniteLogits
        return int(torch.argmax(logits))
    scaled = logits / request.temperature  # finite logits can overflow at a tiny temperature
    if not _usable(scaled):
        raise NonFiniteLogits
    probs = torch.softmax(scaled, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        cut = cumulative - sorted_probs >= request.top_p  # keep the smallest set reaching top_p
        cut[0] = False  # the most likely token always stays: top_p -> 0 means greedy
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice)


def _usable(logits) -> bool:
    """No NaN, no +inf and at least one finite value (-inf alone masks a token, which is fine)."""
    import torch

    return not bool(torch.isnan(logits).any() or torch.isposinf(logits).any()) and bool(
        torch.isfinite(logits).any()
    )
