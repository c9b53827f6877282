"""Which base and adapter a request's `model` names: an adapter reference (`name`, `name:3`,
`name:tag`) goes to the served base its entry was made for (matched by fingerprint, then by base
reference), `base:<ref>` or the bare reference to the base itself; and the /v1/models listing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from adaptory.adapters.serving.http_errors import APIError
from adaptory.adapters.serving.runtime import Runtime
from adaptory.registry.errors import AdaptoryError


class Models:
    """Maps a request's `model` to (runtime, adapter reference or None for the base)."""

    def __init__(self, registry, runtimes: dict[str, Runtime]) -> None:
        self.registry = registry
        self.runtimes = runtimes

    def base_id(self, ref: str) -> str:
        return f"base:{ref}"

    def runtime_for_entry(self, entry) -> Runtime | None:
        fingerprint = entry.base_fingerprint or {}
        for rt in self.runtimes.values():
            fp = rt.base.fingerprint
            if (
                fingerprint.get("weights") == fp.weights
                and fingerprint.get("tokenizer") == fp.tokenizer
            ):
                return rt
        for ref, rt in self.runtimes.items():
            if entry.base_model == ref and (not fingerprint or rt.force):
                return rt
        return None

    def route(self, model: str) -> tuple[Runtime, str | None]:
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' must be a non-empty string", code="missing_model")
        for ref, rt in self.runtimes.items():
            if model in (self.base_id(ref), ref):
                return rt, None
        try:
            entry = self.registry.resolve(model)
        except AdaptoryError as exc:
            raise APIError(
                404, f"model '{model}' not found: {exc.message}", type="not_found_error",
                code="model_not_found",
            ) from None  # fmt: skip
        rt = self.runtime_for_entry(entry)
        if rt is None:
            raise APIError(
                404,
                f"adapter '{entry.ref}' is for base '{entry.base_model}', which this server does not serve",
                type="not_found_error",
                code="model_not_found",
            )
        return rt, entry.ref

    def tokenizer_of(self, model: str | None) -> Runtime:
        """The runtime whose tokenizer a token endpoint uses: `model`'s, or the only base."""
        if model is not None:
            return self.route(model)[0]
        if len(self.runtimes) == 1:
            return next(iter(self.runtimes.values()))
        raise APIError(
            400, "several bases are served; name one with 'model' ("
            + ", ".join(self.base_id(ref) for ref in self.runtimes) + ")",
            code="missing_field",
        )  # fmt: skip

    def listing(self) -> list[dict]:
        data = []
        for ref, rt in self.runtimes.items():
            data.append(model_card(self.base_id(ref), None, rt, ref))
        latest: dict[str, Any] = {}
        for entry in self.registry.list():
            rt = self.runtime_for_entry(entry)
            if rt is None:
                continue
            data.append(model_card(entry.ref, entry, rt, rt.base_ref))
            latest[entry.name] = (entry, rt)
        for name, (entry, rt) in sorted(latest.items()):
            data.append(model_card(name, entry, rt, rt.base_ref))
        return data

    def card(self, model: str) -> dict:
        """GET /v1/models/{model}: the card of whatever `model` routes to, under that id."""
        rt, adapter = self.route(model)
        entry = self.registry.resolve(adapter) if adapter is not None else None
        return model_card(model, entry, rt, rt.base_ref)


def model_card(model_id: str, entry, rt: Runtime, base: str) -> dict:
    """vLLM's model card (`root`, `parent`, `max_model_len`) plus what Adaptory knows."""
    return {
        "id": model_id,
        "object": "model",
        "created": _epoch(entry.created_at) if entry else rt.created,
        "owned_by": "adaptory",
        "root": entry.ref if entry else base,
        "parent": f"base:{base}" if entry else None,
        "max_model_len": rt.max_positions,
        "base": base,
        "task": entry.task if entry else rt.task,
        "method": entry.method if entry else None,
        "ref": entry.ref if entry else None,
    }


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return 0
