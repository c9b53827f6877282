"""The OpenAI protocol as pydantic models: request bodies (checked before any work is queued),
response bodies, and vLLM's /tokenize and /detokenize. Field names and defaults are OpenAI's,
the extras (`top_k`, `min_p`, `ignore_eos`, ...) vLLM's, so its clients work unchanged.

Types are strict (`"stream": "false"` is not a boolean, `1.0` is not an integer, NaN is not a
number) and unknown fields are refused by name: nothing a client sends is silently ignored.
The few fields accepted without effect are harmless by nature (`user`, `metadata`, `store`,
...) and docs/SERVER.md lists them. /openapi.json publishes these models, so schema-driven
fuzzers and clients see every field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_LOGPROBS = 20
MAX_STOPS = 16  # OpenAI takes 4, vLLM any number; lm-eval sends a task's stops plus EOS
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class Strict(BaseModel):
    """Strict types, finite numbers, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Lenient(BaseModel):
    """A response object: what a client may send back in a history carries fields we ignore."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(Strict):
    """The sampling and stopping fields completions and chat share."""

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    temperature: Temperature | None = None
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOPS)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300
    )
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted, no effect (OpenAI's abuse tracking)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: (
        str | list[Annotated[str, Field(min_length=0)]] | list[TokenId] | list[list[TokenId]]
    ) = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list is empty")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("a token-id list is empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _at_least_n(cls, best_of, info: ValidationInfo):
        n = info.data.get("n", 1)
        if best_of is not None and best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        if best_of is not None and best_of > n and info.data.get("stream"):
            raise ValueError("best_of larger than n cannot be streamed")
        return best_of


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ToolCall(Lenient):
    id: str | None = None
    type: str | None = None
    function: dict[str, Any] | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # what the openai client copies back from a reply message; never used
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("'content' may be null only in an assistant turn with tool_calls")
        return self


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # accepted, no effect: OpenAI's storage and routing hints
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top, info: ValidationInfo):
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class TokenizeRequest(Strict):
    """POST /tokenize (vLLM): a prompt, or chat messages rendered by the chat template. Without
    `model`, the one served base (as vLLM, whose server has one model)."""

    model: str | None = Field(None, min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(Strict):
    model: str | None = Field(None, min_length=1)
    tokens: list[TokenId]


class ClassifyRequest(Strict):
    """POST /v1/classify."""

    model: str = Field(min_length=1)
    input: str | list[str]
    user: str | None = None


class AdapterRequest(Strict):
    """POST /v1/adapters/load and /unload."""

    model: str = Field(min_length=1)


# -- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    adapter: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    adapter: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptory"
    root: str
    parent: str | None
    max_model_len: int | None
    base: str
    task: str
    method: str | None
    ref: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM): what a remote-tokenizer client (lm-eval) needs."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


REQUESTS = (
    CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
    ClassifyRequest, AdapterRequest,
)  # fmt: skip
