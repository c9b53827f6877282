"""The hot-swap runtime: one base model loaded once, a bounded LRU of resident adapters, and
batches where every row runs with its own adapter (LoRA, prefix tuning or the plain base).

* LoRA. Resident LoRA adapters live in one `LoraBank` (lora_bank.py): per adapted layer,
  every adapter's A and scaled B stacked in two tensors, applied by a forward hook with a
  per-row gather and batched matmuls (the quantized base layers stay as they are). A row whose
  adapter is not in the bank is an error, never a silent fall-back to the base.
* Prefix tuning. At load time the adapter's saved prompt embeddings become per-layer key/value
  tensors (resident.py); a prefix row carries them in the first positions of its own KV-cache
  slot and runs with no LoRA, its prompt numbered from `num_virtual_tokens` as PEFT numbers it.
* Decoding (decode.py): rows join, step together and leave over a preallocated per-row KV
  cache (kv_cache.py); on CUDA the decode step is a replayed CUDA graph (graphs.py).
* Classification (classify.py): the shared encoder with per-row LoRA, then each row's own head,
  so adapters with different label counts share a batch.

Adapters are loaded by registry reference, verified against their digest and this base's
fingerprint; pinned while rows use them, evicted least recently used beyond the bound.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from adaptory.adapters.bases.loading import BUILTIN_BASES, LoadedBase, load_base
from adaptory.adapters.bases.numerics import resolve_numerics
from adaptory.adapters.bases.quantize import keep_4bit_trainable
from adaptory.adapters.serving.decode import (
    BASE,
    DECODE_MODES,
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
)
from adaptory.adapters.serving.resident import ResidentAdapter
from adaptory.adapters.serving.token_text import token_bytes, token_name
from adaptory.registry.errors import AdaptoryError, BadInput, ConfigError, InvalidAdapter

__all__ = ["BASE", "AdapterInUse", "GenerationRequest", "GenerationResult", "Runtime"]
MAX_AUTO_BATCH = 256  # rows; like vLLM's default max_num_seqs
BREAKER_FAILURES = 3  # requests in a row with non-finite logits before an adapter is refused
BREAKER_SECONDS = 30.0  # for how long (then one request may try it again)
# A refused request is answered after this long (or the refusal's time left, if less): a
# client retrying in a loop then sends about one request a second instead of hundreds, which
# would crowd out every other client (the refusal costs a request's parsing and routing).
REFUSAL_DELAY_S = 1.0


class AdapterRefused(InvalidAdapter):
    """An adapter the breaker refuses for `seconds_left` more (its last rows all failed)."""

    def __init__(self, message: str, *, hint: str | None = None, seconds_left: float) -> None:
        super().__init__(message, hint=hint)
        self.seconds_left = seconds_left


SERVABLE = {"causal-lm": ("lora", "prefix"), "seq-cls": ("lora",)}
_PLACEHOLDER_LABELS = ["LABEL_0", "LABEL_1"]  # the shared seq-cls base's own head is never used


class AdapterInUse(BadInput):
    """An adapter cannot be unloaded while rows of a running batch use it."""


# --- the runtime ---------------------------------------------------------------------------


class Runtime:
    """One base loaded once plus an LRU of up to `max_adapters` resident registry adapters.

    (~280 lines: the LRU and pinning, text encoding, and the thin entry points to decoding
    and classification; reading adapters lives in resident.py, classifying in classify.py.)"""

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
        self.created = int(time.time())  # /v1/models' `created` of the base
        self.base_ref = base_ref
        self.registry = registry
        self._chat_templates: dict[str, str | None] = {}  # adapter digest -> its own template
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
        if self.numerics.name == "fp32":
            # bitsandbytes' CPU inference kernel (AVX512-BF16 CPUs) computes 4-bit layers in
            # bfloat16; fp32 keeps the dequantize-then-matmul path training and eval use.
            keep_4bit_trainable(self.base.model)
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
        self._nonfinite: dict[str, int] = {}  # adapter key -> requests in a row that failed so
        self._refused_until: dict[str, float] = {}  # adapter key -> monotonic time
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None)
        # token ids a request may name: the logits' width (a padded vocabulary may exceed the
        # tokenizer's)
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
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
        from adaptory.adapters.serving.resident import read_adapter

        return read_adapter(self, entry)

    def _acquire(self, ref: str | None) -> tuple[str, ResidentAdapter | None]:
        if ref is None or ref == BASE:
            return BASE, None
        adapter = self.load(ref, pin=True)
        return adapter.key, adapter

    # -- adapters whose logits keep failing --------------------------------------------------

    def note_outcome(self, key: str, *, nonfinite: bool) -> None:
        """Count a finished row of adapter `key`: BREAKER_FAILURES non-finite rows in a row
        refuse the adapter for BREAKER_SECONDS (a success resets the count)."""
        with self.lock:
            if not nonfinite:
                self._nonfinite.pop(key, None)
                return
            count = self._nonfinite.get(key, 0) + 1
            self._nonfinite[key] = count
            if count >= BREAKER_FAILURES:
                self._refused_until[key] = time.monotonic() + BREAKER_SECONDS
                self._nonfinite[key] = 0

    def forget_failures(self) -> None:
        """Drop every failure count and refusal (a fresh start, as after a restart)."""
        with self.lock:
            self._nonfinite.clear()
            self._refused_until.clear()

    def refusal(self, key: str) -> AdapterRefused | None:
        """Why adapter `key` is refused without running (its last rows all failed), or None."""
        with self.lock:
            until = self._refused_until.get(key)
            if until is None:
                return None
            left = until - time.monotonic()
            if left <= 0:
                del self._refused_until[key]
                return None
        return AdapterRefused(
            f"adapter {key} produced non-finite logits (NaN or infinity) on its last "
            f"{BREAKER_FAILURES} requests; refused for {left:.0f} s more",
            hint="check the adapter's weights for NaN, infinity or huge values",
            seconds_left=left,
        )

    def _release(self, adapter: ResidentAdapter | None) -> None:
        if adapter is not None:
            with self.lock:
                adapter.pins -= 1
                self._evict_beyond(self.max_adapters)

    def _rows(self, keys: list[str]):
        """The LoRA bank's routing for a forward whose row i runs adapter keys[i]."""
        return self._bank.rows([key if key in self._bank.slots else None for key in keys])

    def _bank_rows(self, slots, *, static: bool = False, reuse: object = None, groups=None):
        """The LoRA bank's routing from a device tensor of bank slots, one per row."""
        return self._bank.rows_from(slots, static=static, reuse=reuse, groups=groups)

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

    def chat_prompt(self, messages: list[dict], adapter: str | None = None) -> str:
        """Render chat messages with the chat template (`adapter`'s, if it was trained with its
        own, else the tokenizer's), ready for the reply."""
        return self.render_chat(messages, adapter=adapter)

    def chat_template_of(self, adapter: str | None) -> str | None:
        """The chat template adapter `adapter` was trained with (`--chat-template`), or None."""
        if adapter is None:
            return None
        from adaptory.registry.adapter_files import CHAT_TEMPLATE_FILE

        entry = self.registry.resolve(adapter)
        with self.lock:
            if entry.digest in self._chat_templates:
                return self._chat_templates[entry.digest]
        # Unverified read: loading the adapter verifies every file of it, this one included.
        path = self.registry.files(entry, verify=False) / CHAT_TEMPLATE_FILE
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        with self.lock:
            self._chat_templates[entry.digest] = text
        return text

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (special tokens added unless it was rendered by a chat template)."""
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        if request.messages is not None:
            return self.encode(self.chat_prompt(request.messages, request.adapter), chat=True)
        return self.encode(request.prompt or "")

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes (special tokens as written), for logprobs (token_text.py)."""
        with self._tok_lock:
            return token_bytes(self.tokenizer, ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's name as logprobs give it, for /tokenize: its text, or `bytes:\\xNN` for
        part of a character."""
        return [token_name(piece) for piece in self.token_bytes(ids)]

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        adapter: str | None = None,
    ) -> str:
        """Like chat_prompt, with the reply's opening optional (/tokenize)."""
        template = self.chat_template_of(adapter)
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"base {self.base_ref} has no chat template",
                hint="train the adapter with --chat-template NAME|FILE",
            )
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                chat_template=template,
            )

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
            (request, (lambda delta, i=i: on_text(i, delta.text)) if on_text else None)
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
        from adaptory.adapters.serving import classify

        return classify.classify(self, ref, texts)

    def classify_max_length(self) -> int:
        from adaptory.adapters.serving import classify

        return classify.classify_max_length(self)

    def classify_lengths(self, texts: list[str]) -> list[int]:
        """Each text's token count as classified (special tokens in, truncated)."""
        from adaptory.adapters.serving import classify

        return classify.classify_lengths(self, texts)

    def classify_mixed(self, rows: list[tuple[str, str]]) -> list[dict]:
        """One encoder pass for (adapter ref, text) rows with different adapters and heads."""
        from adaptory.adapters.serving import classify

        return classify.classify_mixed(self, rows)
