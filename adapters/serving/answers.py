"""The bodies and stream chunks of completions and chat answers, in OpenAI's shapes: choices in
order with their `index`, `best_of` ranked by cumulative logprob, `echo`'d prompts, logprobs
(the legacy completions shape, or chat's `content` list) and usage summed over the choices."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptory.adapters.serving.decode import GenerationResult, TextDelta
from adaptory.adapters.serving.logprobs import TokenLogprob
from adaptory.adapters.serving.protocol import ChatCompletionRequest, CompletionRequest
from adaptory.adapters.serving.token_text import TextOffsets, token_name


@dataclass
class Answer:
    """One request's answer: the parts every chunk or body repeats, and per-choice state while
    streaming (echo sent, logprobs sent, text offset)."""

    ident: str
    created: int
    model: str
    chat: bool
    request: CompletionRequest | ChatCompletionRequest
    prompts: Sequence[Any]  # streaming.Prompt: .ids, .text
    count: int  # jobs per prompt (n, or best_of)
    tokens: Callable[[list[int]], list[bytes]]  # token ids -> their bytes (token_text.py)
    started: set[int] = field(default_factory=set)
    logprobs_sent: dict[int, int] = field(default_factory=dict)
    offsets: dict[int, TextOffsets] = field(default_factory=dict)

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.request.logprobs) if self.chat else self.request.logprobs is not None

    @property
    def echo(self) -> bool:
        return not self.chat and self.request.echo

    # -- whole answers --------------------------------------------------------------------

    def body(self, results: list[GenerationResult]) -> dict:
        """The whole answer: each prompt's choices (the best `n` of `best_of`), in order."""
        n = self.request.n
        choices, returned = [], []
        for p, prompt in enumerate(self.prompts):
            group = results[p * self.count : (p + 1) * self.count]
            if self.count > n:  # best_of: the n most likely by cumulative logprob
                group = sorted(group, key=lambda r: -(r.cumulative_logprob or 0.0))[:n]
            for k, result in enumerate(group):
                choices.append(self._choice(p * n + k, prompt, result))
                returned.append(result)
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(returned),
            "adapter": returned[0].adapter if returned else None,
        }

    def _choice(self, index: int, prompt, result: GenerationResult) -> dict:
        if self.chat:
            logprobs = None
            if self.wants_logprobs:
                logprobs = {"content": self._chat_logprobs(result.logprobs or [])}
            return {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": logprobs,
                "finish_reason": result.finish_reason,
            }
        text = (prompt.text if self.echo else "") + result.text
        logprobs = None
        if self.wants_logprobs:
            entries: list[TokenLogprob | None] = []
            if self.echo:
                entries += result.prompt_logprobs or [None] * len(result.prompt_ids)
                ids = list(result.prompt_ids)
            else:
                ids = []
            entries += result.logprobs or []
            ids += [e.token for e in result.logprobs or []]
            logprobs = self._completion_logprobs(ids, entries, TextOffsets())
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": result.finish_reason,
        }

    def _usage(self, results: list[GenerationResult]) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(r.completion_tokens for r in results)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # -- stream chunks ----------------------------------------------------------------------

    def chunk(
        self,
        index: int,
        *,
        delta: TextDelta | None = None,
        result: GenerationResult | None = None,
        role: bool = False,
    ) -> dict:
        """One choice's chunk: its first (chat: the role), new text, or its end."""
        prompt = self.prompts[index // self.count]
        text, entries, ids = (delta.text if delta else ""), [], []
        first = index not in self.started
        self.started.add(index)
        if self.echo and first:
            text = prompt.text + text
            if self.wants_logprobs:
                prompt_lp = (delta.prompt_logprobs if delta else None) or (
                    result.prompt_logprobs if result else None
                )
                entries += prompt_lp or [None] * len(prompt.ids)
                ids += list(prompt.ids)
        if self.wants_logprobs and not role:
            new = (
                delta.logprobs
                if delta
                else (result.logprobs or [])[self.logprobs_sent.get(index, 0) :]
            )
            self.logprobs_sent[index] = self.logprobs_sent.get(index, 0) + len(new)
            entries += new
            ids += [e.token for e in new]
        finish = result.finish_reason if result else None
        if self.chat:
            content: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                content["content"] = text
            logprobs = None
            if self.wants_logprobs and not role:
                logprobs = {"content": self._chat_logprobs([e for e in entries if e])}
            choice = {
                "index": index,
                "delta": content,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            logprobs = None
            if self.wants_logprobs:
                offsets = self.offsets.setdefault(index, TextOffsets())
                logprobs = self._completion_logprobs(ids, entries, offsets)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        data = self._chunk_head()
        data["choices"] = [choice]
        if self.include_usage:
            data["usage"] = None
        return data

    def usage_chunk(self, results: list[GenerationResult]) -> dict:
        data = self._chunk_head()
        data["choices"], data["usage"] = [], self._usage(results)
        return data

    def _chunk_head(self) -> dict:
        return {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    # -- logprobs ---------------------------------------------------------------------------

    def _completion_logprobs(
        self, ids: list[int], entries: list[TokenLogprob | None], offsets: TextOffsets
    ) -> dict:
        """OpenAI's legacy shape; `top_logprobs` maps token name to logprob, the chosen token
        included (a prompt's first token has none); `offsets` carries the choice's text position
        from chunk to chunk."""
        pieces = self.tokens(ids)
        strings = [token_name(p) for p in pieces]
        alternatives = sorted({t for e in entries if e for t, _ in e.top})
        name_of = dict(zip(alternatives, map(token_name, self.tokens(alternatives)), strict=True))
        tops = []
        for text, entry in zip(strings, entries, strict=True):
            if entry is None:
                tops.append(None)
                continue
            top = {name_of[t]: lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
        return {
            "tokens": strings,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets.advance(pieces),
        }

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> list[dict]:
        ids = [e.token for e in entries] + [t for e in entries for t, _ in e.top]
        pieces = dict(zip(ids, self.tokens(ids), strict=True))
        return [
            {
                "token": token_name(pieces[e.token]),
                "logprob": e.logprob,
                "bytes": list(pieces[e.token]),
                "top_logprobs": [
                    {"token": token_name(pieces[t]), "logprob": lp, "bytes": list(pieces[t])}
                    for t, lp in e.top
                ],
            }
            for e in entries
        ]
