"""Request and response models of the OpenAI-compatible API.

The request models are the validation layer and the source of the OpenAPI schema, so their bounds
are the real ones: anything the schema allows either runs or is refused with a 400 that says why.
They are strict (no "5" for 5, no true for 1) like OpenAI's own API, and ignore unknown fields, as
OpenAI's does, so that newer clients keep working.
"""
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# any signed 64-bit seed (OpenAI's range): the runners wrap seed + sample index modulo 2**64 for numpy
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_N = 16
MAX_LOGPROBS = 20


def _whole(value: Any) -> Any:
    # JSON Schema's "integer" includes 3.0, and so do some clients' encoders
    return int(value) if type(value) is float and value.is_integer() else value


def _int(**bounds) -> Any:
    """A strict integer (no "3", no true) that also takes 3.0, with its bounds in the schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


_Text = Annotated[str, Field(min_length=1)]
_TokenId = _int(ge=0)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", populate_by_name=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Request):
    """What both endpoints take: OpenAI's sampling parameters and vLLM's extras."""

    model: str = Field(description="The served model's name (GET /v1/models).")
    n: _int(ge=1, le=MAX_N) | None = 1
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: _Text | list[_Text] | None = None
    seed: _int(ge=SEED_MIN, le=SEED_MAX) | None = None
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported: must be empty.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: _int(ge=-1, description="-1 or 0: off.") | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[_int()] | None = None
    ignore_eos: bool | None = False
    min_tokens: _int(ge=0) | None = 0
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[
        _Text,
        Annotated[list[_Text], Field(min_length=1)],
        Annotated[list[_TokenId], Field(min_length=1)],
        Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1)],
    ] = Field(description="A string, a batch of strings, a list of token ids, or a batch of token-id lists.")
    max_tokens: _int(ge=1) | None = 16
    logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool | None = False
    suffix: str | None = Field(default=None, description="Not supported: must be null.")
    best_of: _int(ge=1, le=MAX_N, description="Only best_of == n is supported.") | None = None


    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # One plain message, rather than pydantic's error for each branch of the union
        if value == "" or value == []:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and any(p == "" or p == [] for p in value):
            raise ValueError("a prompt in the batch is empty")
        if isinstance(value, list) and any(type(t) is int and t < 0 for p in value for t in (p if isinstance(p, list) else [p])):
            raise ValueError("token ids must be non-negative")
        return value


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class _Message(_Request):
    content: str | list[TextContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Say plainly what is unsupported, rather than pydantic's error for each union branch.
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content[{i}] has type {kind!r}: only text parts are supported")
        return value


class SystemMessage(_Message):
    role: Literal["system"]


class DeveloperMessage(_Message):
    """OpenAI's newer name for a system message; rendered as one."""

    role: Literal["developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[TextContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: str | None = None


ChatMessage = Annotated[
    Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
    Field(discriminator="role"),
]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: _int(ge=1, description="Deprecated by OpenAI for max_completion_tokens.") | None = None
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported: must be empty.")
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, description="Not supported: must be empty.")
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra variables for the chat template (e.g. enable_thinking).")


# --- responses (documentation: the handlers build plain dicts of this shape) ---------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
