"""Decoding many requests as one batch: rows with different adapters (LoRA, prefix tuning, the
plain base) join between steps, decode together, and leave when they finish.

Every row owns one slot of a preallocated KV cache (kv_cache.py) and its own positions:
[prefix][prompt][generated]. Joining rows are prefilled together (right-padded prompts, one
forward); a decode step feeds each row's last token at its own position. The step has static
shapes — slots [0, B) with B rounded up to a bucket, positions [0, view) with view rounded up —
so on CUDA it is captured once per bucket as a CUDA graph and replayed (graphs.py); the same
step runs eagerly on the CPU and wherever capture is impossible, or compiled with torch.compile.

LoRA rows go through the runtime's LoraBank (each row gathers its own A and B); prefix rows run
with the bank's zero slot and their prefix key/values in their slot's first positions, numbered
as PEFT numbers them (the prompt starts at position num_virtual_tokens).

A row that cannot go on (non-finite logits from broken weights, a failing callback) ends alone
with its error; the others are unaffected.

Kept as one module (~650 lines): DecodeBatch and the per-token helpers it steps with share one
row model.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from adaptory.adapters.serving.detokenize import IncrementalText
from adaptory.adapters.serving.kv_cache import KVShape, RowKVCache, bucket
from adaptory.adapters.serving.logprobs import TokenLogprob, cumulative, token_logprobs
from adaptory.adapters.serving.lora_bank import group_rows
from adaptory.adapters.serving.sampling import Controls, Sampling, pick_tokens
from adaptory.registry.errors import AdaptoryError, BadInput, ConfigError, InvalidAdapter

log = logging.getLogger("adaptory.serving")

BASE = "__base__"  # the routing key of rows that run on the plain base
DECODE_MODES = ("auto", "eager", "cuda-graphs", "compile")
SMALLEST_VIEW = 32  # positions: views come in powers of two from here


@dataclass
class GenerationRequest:
    """One completion: a prompt (or chat messages, or token ids) for an adapter (None = base).

    `max_new_tokens` 0 only scores the prompt. `logprobs` / `prompt_logprobs`: None for none,
    else how many alternatives each generated / prompt token reports (0: its own only)."""

    prompt: str | None = None
    adapter: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 32
    fit_context: bool = False  # max_new_tokens is a ceiling: shorten it to the context left
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.min_p)

    @property
    def controls(self) -> Controls:
        return Controls(
            tuple(sorted(self.logit_bias.items())),
            self.min_tokens,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
        )


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None  # the resolved reference, name:version
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per sampled token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first token's is None
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class TextDelta:
    """A row's new text, the logprobs of the tokens that made it (when asked for), and with
    the first delta the prompt's logprobs (echo)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Row:
    request: GenerationRequest
    key: str  # adapter key or BASE
    adapter: Any  # ResidentAdapter | None
    prompt_ids: list[int]
    generator: Any
    on_text: Callable[[TextDelta], None] | None
    detok: IncrementalText
    prefix_len: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    sampled: int = 0
    finish_reason: str | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None  # why this row alone ended early (finish_reason "error")
    logits: list = field(default_factory=list)  # per step, when the batch keeps them
    sampling: Sampling = field(default_factory=Sampling)
    controls: Controls = field(default_factory=Controls)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0  # entries of token_logprobs passed to on_text so far
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def bank_key(self) -> str:
        """Prefix rows run with LoRA off: their adapter routes nowhere in the bank."""
        return BASE if self.prefix_len else self.key


def holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop sequence (or a split char)."""
    keep = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list) else {int(ids)}


class DecodeBatch:
    """Rows decoding together over one RowKVCache; rows join (`add_many`) and leave (`drop`)
    between steps. Row i of `rows` lives in cache slot i. (One idea, ~370 lines: joining,
    stepping and leaving share the slot bookkeeping, which must not be split apart.)"""

    def __init__(
        self,
        runtime,
        *,
        keep_logits: bool = False,
        slots: int = 8,
        length: int | None = None,
        mode: str | None = None,
    ) -> None:
        if runtime.task != "causal-lm":
            raise ConfigError(
                f"base {runtime.base_ref} is a {runtime.task} base; it cannot generate"
            )
        self.rt = runtime
        self.keep_logits = keep_logits  # tests and benchmarks compare these with references
        self.rows: list[_Row] = []
        model = runtime.model
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        self.device = torch.device(runtime.base.device)
        dtype = model.get_input_embeddings().weight.dtype
        self.max_length = runtime.max_positions or 2048
        self.cache = RowKVCache(
            KVShape.of(model.config, dtype),
            slots=slots,
            length=min(length or 256, self.max_length),
            device=self.device,
        )
        self._resize_buffers(self.cache.slots)
        self.lengths: list[int] = [0] * self.cache.slots  # host copy of each slot's positions
        self.bank_host: list[int] = [0] * self.cache.slots  # host copy of bank_rows
        self.group_offsets: torch.Tensor | None = None
        self._groups_key: tuple | None = None
        self.written: list[int] = [0] * self.cache.slots  # positions written since last cleared
        self._eager_attention = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._eos = eos_ids(model, runtime.tokenizer)
        self.steps = 0
        self.routing = 0  # changes whenever rows join, leave or change slots
        self.runner = StepRunner.for_batch(self, mode or getattr(runtime, "decode_mode", "auto"))

    def _resize_buffers(self, slots: int) -> None:
        """Per-slot device state the decode step reads (a captured graph's static inputs):
        each slot's last token, the position it goes to, and its LoRA-bank slot."""
        n = len(self.rows)
        for name in ("last_tokens", "positions", "bank_rows", "group_order", "group_inverse"):
            new = torch.zeros(slots, dtype=torch.long, device=self.device)
            old = getattr(self, name, None)
            if old is not None:
                new[:n] = old[:n]
            setattr(self, name, new)

    @property
    def active(self) -> int:
        return len(self.rows)

    # -- joining ------------------------------------------------------------------------------

    def add(self, request: GenerationRequest, *, on_text=None) -> _Row:
        """Prefill one request into the batch (loads its adapter if needed)."""
        return self.add_many([(request, on_text)])[0]

    def add_many(self, items: list[tuple[GenerationRequest, Any]]) -> list[_Row]:
        """Prefill several requests in one forward pass and add them to the running batch.

        All or nothing: if it raises, no row joined the batch and no text was emitted, so the
        caller may retry the requests one by one. A row that fails on its own (non-finite
        logits) joins and ends at once with `error` set; the others are unaffected.
        """
        rt = self.rt
        rows: list[_Row] = []
        try:
            for request, on_text in items:
                rows.append(self._new_row(request, on_text))
            with rt.lock, torch.no_grad():
                self._make_room(rows)
                logits = self._prefill(rows)
        except BaseException:
            for row in rows:
                rt._release(row.adapter)
            raise
        start = len(self.rows)
        self.rows.extend(rows)
        self.routing += 1
        self._advance(rows, logits, start)
        return rows

    def _new_row(self, request: GenerationRequest, on_text) -> _Row:
        rt = self.rt
        if request.max_new_tokens < 0:
            raise BadInput("max_new_tokens must not be negative")
        ids = rt.prompt_ids(request)
        if not ids:
            raise BadInput("the prompt is empty")
        key, adapter = rt._acquire(request.adapter)
        try:
            generator = torch.Generator()
            # unseeded: fresh entropy (torch.seed() would also reseed the global generator,
            # and costs a captured stack trace per call before CUDA is initialised)
            seed = request.seed
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            prefix = adapter.num_virtual_tokens if adapter is not None else 0
            row = _Row(
                request, key, adapter, ids, generator, on_text, IncrementalText(rt.tokenizer)
            )
            row.prefix_len = prefix
            row.sampling, row.controls = request.sampling, request.controls
            need = prefix + len(ids) + request.max_new_tokens
            if (
                need > self.max_length
                and request.fit_context
                and prefix + len(ids) < self.max_length
            ):
                request = replace(request, max_new_tokens=self.max_length - prefix - len(ids))
                row.request, need = request, self.max_length
            if need > self.max_length:
                raise BadInput(
                    f"prompt ({len(ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                    f"exceeds the base's context of {self.max_length} tokens"
                )
        except BaseException:
            rt._release(adapter)
            raise
        return row

    def _make_room(self, rows: list[_Row]) -> None:
        """Grow the cache (rarely) so the new rows fit: their slots, and every position their
        right-padded prefill writes or their generation reaches."""
        width = max(len(r.prompt_ids) for r in rows)
        length = max(
            r.prefix_len + max(width, len(r.prompt_ids) + r.request.max_new_tokens) for r in rows
        )
        slots = len(self.rows) + len(rows)
        if slots <= self.cache.slots and length <= self.cache.length:
            return
        self.cache.grow(
            slots=bucket(slots),
            length=max(length, min(bucket(length, smallest=SMALLEST_VIEW), self.max_length)),
            keep_rows=len(self.rows),
            keep_length=max(self.lengths[: len(self.rows)], default=0),
        )
        if self.cache.slots > len(self.lengths):
            self.lengths += [0] * (self.cache.slots - len(self.lengths))
            self.written += [0] * (self.cache.slots - len(self.written))
            self.bank_host += [0] * (self.cache.slots - len(self.bank_host))
            self._resize_buffers(self.cache.slots)

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """One forward over the new rows' prompts (right-padded) into slots [n, n + m); returns
        each row's logits for its first generated token."""
        start, m = len(self.rows), len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.rt.tokenizer.pad_token_id or 0
        ids = torch.full((m, width), pad, dtype=torch.long)
        firsts = torch.tensor([r.prefix_len for r in rows], dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.prompt_ids)] = torch.tensor(row.prompt_ids, dtype=torch.long)
            if row.prefix_len:
                self.cache.write_prefix(start + i, row.adapter.prefix)
        ids = ids.to(self.device)
        cols = (firsts[:, None] + torch.arange(width)[None]).to(self.device)
        view = bucket(int(cols.max()) + 1, smallest=SMALLEST_VIEW, largest=self.cache.length)
        with self.rt._rows([r.bank_key for r in rows]):
            hidden = self._decoder(ids, cols, start, view)
        last = torch.tensor([len(r.prompt_ids) - 1 for r in rows], device=self.device)
        logits = self.head(hidden[torch.arange(m, device=self.device), last]).float()
        self._prompt_logprobs(rows, hidden)  # echo scoring, from this same forward
        for i, row in enumerate(rows):
            slot = start + i
            self.lengths[slot] = row.prefix_len + len(row.prompt_ids)
            self.written[slot] = max(self.written[slot], row.prefix_len + width)
            self.bank_host[slot] = self.rt._bank_slot(row.bank_key)
            self.bank_rows[slot] = self.bank_host[slot]
        self.positions[start : start + m] = torch.tensor(self.lengths[start : start + m])
        return logits

    def _prompt_logprobs(self, rows: list[_Row], hidden: torch.Tensor) -> None:
        """Each scoring row's prompt tokens' log-probabilities given the tokens before them
        (None for the first), from the prefill's hidden states: one head pass and one
        log-softmax over every scored position of the batch."""
        scoring = [(i, r) for i, r in enumerate(rows) if r.request.prompt_logprobs is not None]
        if not scoring:
            return
        states, targets, ks = [], [], []
        for i, row in scoring:
            n = len(row.prompt_ids) - 1
            states.append(hidden[i, :n])
            targets += row.prompt_ids[1:]
            ks += [row.request.prompt_logprobs] * n
        entries = token_logprobs(self.head(torch.cat(states)), targets, ks)
        at = 0
        for _, row in scoring:
            n = len(row.prompt_ids) - 1
            row.prompt_logprobs = [None, *entries[at : at + n]] if row.prompt_ids else []
            at += n

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[_Row]:
        """One decode step for every row; returns the rows that finished (already dropped)."""
        if not self.rows:
            return []
        with self.rt.lock:
            n = len(self.rows)
            view = max(self.lengths[:n]) + 1
            logits = self.runner.run(n, view)[:n]
            self.positions[:n] += 1
            for i in range(n):
                self.lengths[i] += 1
                self.written[i] = max(self.written[i], self.lengths[i])
            self.steps += 1
            return self._advance(list(self.rows), logits, 0)

    def decode_step(self, batch: int, view: int, *, static: bool) -> torch.Tensor:
        """The decode forward for slots [0, batch) attending positions [0, view), with each
        row's adapter. `static`: the LoRA bank takes no data-dependent shortcut (graphs)."""
        reuse = None if static else (id(self), self.routing)
        groups = self.groups(batch)
        with self.rt._bank_rows(self.bank_rows[:batch], static=static, reuse=reuse, groups=groups):
            return self.step_body(batch, view)

    def groups(self, batch: int):
        """For the bank's grouped path (GPU): slots [0, batch) sorted by bank slot, the way back
        and each bank slot's end offset, in static buffers refreshed only when rows or the
        bucket change (a graph runner calls this before capturing or replaying). None when the
        bank does not use the grouped path here."""
        bank = self.rt._bank
        if not bank.grouped_usable():
            return None
        key = (self.routing, batch, bank.capacity)
        if key != self._groups_key:
            order, inverse, ends = group_rows(self.bank_host[:batch], bank.capacity)
            if self.group_offsets is None or len(self.group_offsets) != bank.capacity:
                self.group_offsets = torch.zeros(
                    bank.capacity, dtype=torch.int32, device=self.device
                )
            self.group_order[:batch] = torch.tensor(order)
            self.group_inverse[:batch] = torch.tensor(inverse)
            self.group_offsets[:] = torch.tensor(ends, dtype=torch.int32)
            self._groups_key = key
        return self.group_order[:batch], self.group_inverse[:batch], self.group_offsets

    def step_body(self, batch: int, view: int) -> torch.Tensor:
        """Each slot's last token at its own position, logits out. Reads only the batch's
        persistent buffers, so a captured graph of it replays correctly after they change."""
        cols = self.positions[:batch, None]
        hidden = self._decoder(self.last_tokens[:batch, None], cols, 0, view)
        return self.head(hidden[:, -1]).float()

    def _decoder(
        self, ids: torch.Tensor, cols: torch.Tensor, start: int, view: int
    ) -> torch.Tensor:
        """The base's decoder over `ids` (B, L) at positions `cols` of slots [start, start + B),
        each token attending its own row's positions up to its own."""
        self.cache.window(start, cols, view)
        allowed = torch.arange(view, device=cols.device)[None, None, :] <= cols[:, :, None]
        if self._eager_attention:  # eager attention adds the mask; sdpa takes booleans
            dtype = self.cache.shape.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=cols.device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
        out = self.decoder(
            input_ids=ids,
            attention_mask=mask[:, None],
            position_ids=cols,
            use_cache=True,
            **{self.rt._decoder_cache_kwarg: self.cache},
        )
        return out[0]

    # -- finishing -------------------------------------------------------------------------------

    def _advance(self, rows: list[_Row], logits: torch.Tensor, start: int) -> list[_Row]:
        """Take each row's next token (rows = self.rows[start:start + len(rows)]); finish rows."""
        raw = logits
        shaped = [i for i, r in enumerate(rows) if r.controls.active]
        if shaped:
            logits = logits.clone()
            for i in shaped:
                logits[i] = rows[i].controls.apply(
                    logits[i],
                    prompt=rows[i].prompt_ids,
                    generated=rows[i].generated,
                    ends=self._ends(rows[i]),
                )
        tokens = pick_tokens(logits, [r.sampling for r in rows], [r.generator for r in rows])
        scored = [
            i for i, r in enumerate(rows)
            if r.request.logprobs is not None and tokens[i] is not None
            and r.request.max_new_tokens > 0
        ]  # fmt: skip
        if scored:
            entries = token_logprobs(
                raw[scored], [tokens[i] for i in scored], [rows[i].request.logprobs for i in scored]
            )
            for i, entry in zip(scored, entries, strict=True):
                rows[i].token_logprobs.append(entry)
        known = [t for t in tokens if t is not None]
        if known:
            slots = [start + i for i, t in enumerate(tokens) if t is not None]
            self.last_tokens[torch.tensor(slots, device=self.device)] = torch.tensor(
                known, device=self.device
            )
        finished = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            try:
                if self.keep_logits:
                    row.logits.append(logits[i].clone())
                if row.request.max_new_tokens == 0:  # scored its prompt; generates nothing
                    row.finish_reason = "length"
                    emit(row)
                elif token is None:
                    raise NonFiniteRow
                else:
                    take_token(row, token, self._eos)
            except Exception as exc:
                row.error, row.finish_reason = row_error(row, exc, self.rt.base_ref), "error"
            if row.finish_reason is not None:
                finished.append(row)
                if row.adapter is not None:
                    nonfinite = isinstance(row.error, InvalidAdapter)
                    self.rt.note_outcome(row.adapter.key, nonfinite=nonfinite)
        if finished:
            self.drop(finished)
        return finished

    def _ends(self, row: _Row) -> set[int]:
        """The tokens that would end `row` (what `min_tokens` holds back)."""
        return {*row.request.stop_token_ids, *(() if row.request.ignore_eos else self._eos)}

    def drop(self, rows: Iterable[_Row], *, reason: str | None = None) -> None:
        """Remove rows (finished or cancelled): each hole takes the last row, so the remaining
        rows stay in slots [0, n)."""
        gone = {id(r) for r in rows}
        for row in self.rows:
            if id(row) in gone:
                if row.finish_reason is None:
                    row.finish_reason = reason or "cancelled"
                self.rt._release(row.adapter)
        self.routing += 1
        slot = 0
        while slot < len(self.rows):
            if id(self.rows[slot]) not in gone:
                slot += 1
                continue
            last = len(self.rows) - 1
            if slot != last:
                self._move(last, slot)
                self.rows[slot] = self.rows[last]
            self.cache.clear(last, 0, self.written[last])
            self.written[last] = 0
            self.lengths[last] = 0
            self.positions[last] = 0
            self.bank_rows[last] = 0
            self.bank_host[last] = 0
            self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        """Row in slot `src` takes slot `dst`; what dst's old row wrote past it is zeroed."""
        self.cache.move(src, dst, self.lengths[src])
        self.cache.clear(dst, self.lengths[src], self.written[dst])
        self.written[dst] = self.lengths[src]
        self.lengths[dst] = self.lengths[src]
        self.bank_host[dst] = self.bank_host[src]
        for buffer in (self.last_tokens, self.positions, self.bank_rows):
            buffer[dst] = buffer[src]


# --- one row's text ---------------------------------------------------------------------------


def take_token(row: _Row, token: int, eos: set[int]) -> None:
    """Record a row's next token: its text, stop strings, length limit, end of sequence."""
    row.sampled += 1
    request = row.request
    ends = (token in eos and not request.ignore_eos) or token in request.stop_token_ids
    if ends:
        row.finish_reason = "stop"
    else:
        row.generated.append(token)
        before = len(row.text)
        row.detok.add(token)
        row.text = row.detok.text
        if len(row.generated) >= row.request.max_new_tokens:
            row.detok.finish()
            row.text = row.detok.text
        for stop in row.request.stop:
            cut = row.text.find(stop, max(0, before - len(stop) + 1)) if stop else -1
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish_reason = "stop"
        if row.finish_reason is None and len(row.generated) >= row.request.max_new_tokens:
            row.finish_reason = "length"
    if ends:
        row.detok.finish()
        row.text = row.detok.text
    emit(row)


def emit(row: _Row) -> None:
    """Send the row's new text (holding back what may still become a stop string); make its
    result when it has finished."""
    end = len(row.text)
    if row.finish_reason is None:
        end -= holdback(row.text, row.request.stop)
    if end > row.sent:
        delta, row.sent = row.text[row.sent : end], end
        entries = row.token_logprobs[row.logprobs_sent :]
        first = row.sent == len(delta)
        row.logprobs_sent = len(row.token_logprobs)
        if row.on_text:
            row.on_text(TextDelta(delta, entries, row.prompt_logprobs if first else None))
    if row.finish_reason is not None and row.result is None and row.error is None:
        wanted = row.request.logprobs is not None
        row.result = GenerationResult(
            text=row.text,
            token_ids=list(row.generated),
            finish_reason=row.finish_reason,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=row.sampled,
            adapter=row.adapter.key if row.adapter else None,
            prompt_ids=list(row.prompt_ids),
            logprobs=list(row.token_logprobs) if wanted else None,
            prompt_logprobs=row.prompt_logprobs,
            cumulative_logprob=cumulative(row.token_logprobs) if wanted else None,
        )


def row_error(row: _Row, exc: Exception, base_ref: str) -> BaseException:
    """The error a row alone ends with: a domain error naming its adapter for unusable logits."""
    if not isinstance(exc, NonFiniteRow):
        return exc
    where = f"at generated token {row.sampled + 1}"
    if row.adapter is not None:
        return InvalidAdapter(
            f"adapter {row.adapter.key} produced non-finite logits (NaN or infinity) "
            f"{where}; its weights are unusable",
            hint="check the adapter's weights for NaN, infinity or huge values",
        )
    return AdaptoryError(f"base {base_ref} produced non-finite logits {where}")


class NonFiniteRow(Exception):
    """This row's logits cannot be sampled from (NaN or +inf)."""


# --- how a step runs ------------------------------------------------------------------------


class StepRunner:
    """Runs a batch's decode step eagerly (exact shapes); subclasses capture or compile it."""

    name = "eager"

    def __init__(self, batch: DecodeBatch) -> None:
        self.batch = batch

    @staticmethod
    def for_batch(batch: DecodeBatch, mode: str) -> StepRunner:
        from adaptory.adapters.serving.graphs import CompiledSteps, GraphedSteps, cuda_graphs_usable

        if mode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode '{mode}'", hint=f"choose one of {DECODE_MODES}")
        if mode == "compile":
            return CompiledSteps(batch)
        on_cuda = batch.device.type == "cuda"
        if mode == "cuda-graphs" and not on_cuda:
            raise ConfigError("decode mode 'cuda-graphs' needs a CUDA device")
        if mode == "cuda-graphs" or (mode == "auto" and on_cuda and cuda_graphs_usable()):
            return GraphedSteps(batch)
        return StepRunner(batch)

    def run(self, n: int, longest: int) -> torch.Tensor:
        """Logits of slots [0, n) (at least), every row attending its positions up to `longest`."""
        view = bucket(longest, smallest=SMALLEST_VIEW, largest=self.batch.cache.length)
        with torch.no_grad():
            return self.batch.decode_step(n, view, static=False)
