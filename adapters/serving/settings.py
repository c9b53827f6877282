"""What an operator sets for one server (`adaptory serve`'s options): the key, the admin switch,
batch and body limits, the connection deadlines. Routes read it from `app.state.settings`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    api_key: str | None = None
    admin: bool = True  # /v1/adapters/load and /unload
    max_batch: int | None = None  # rows decoding together per base; None: as the KV cache allows
    batch_window_ms: float = 5.0
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    max_prompt_tokens: int = 2048
    default_max_tokens: int = 16
    max_choices: int = 256  # prompts x (best_of or n) per request; more is refused (400)
    max_body_bytes: int = 1 << 20  # a request body over this is refused (413) unread
    max_classify_inputs: int = 128  # texts per /v1/classify request; more is refused (400)
    classify_chunk_rows: int = 16  # texts per encoder pass; other requests run between passes
    classify_chunk_tokens: int = 4096  # padded tokens (texts x longest) per encoder pass
    header_timeout_s: float = 10.0  # a connection must finish its request headers in this time
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # the largest request line + headers uvicorn buffers

    def __repr__(self) -> str:  # never show the key
        key = "set" if self.api_key else None
        return f"ServerSettings(api_key={key}, admin={self.admin}, max_batch={self.max_batch})"
