"""Ollama's request and response bodies, as pydantic models (and so as the OpenAPI schema).

Types are checked the way Ollama's Go server decodes JSON: a string is not a number, a number is
not a bool; unknown options are ignored.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

NDJSON = "application/x-ndjson"

# Ollama's DefaultOptions (api/types.go): what a request gets for every option it leaves out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
DEFAULT_MIN_P = 0.0
DEFAULT_REPEAT_PENALTY = 1.1

# --------------------------------------------------------------------------------------------
# request and response models


def _number(value: Any) -> Any:
    # pydantic's lax mode would take true or "0.5" as a number; Go's decoder, and so Ollama,
    # refuses both.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return value


def _integer(value: Any) -> Any:
    _number(value)
    return int(value)  # Ollama truncates a float given for an integer option


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


Num = Annotated[float, BeforeValidator(_number)]
Int = Annotated[int, BeforeValidator(_integer)]
Bool = Annotated[bool, BeforeValidator(_boolean)]


class OllamaOptions(BaseModel):
    """Ollama's runtime options. Those ember cannot apply are accepted and ignored, as Ollama
    ignores options a model does not use; unknown names are ignored too."""

    model_config = ConfigDict(extra="allow")

    num_keep: Int | None = None
    seed: Int | None = Field(None, description="-1 or absent: a random seed")
    num_predict: Int | None = Field(
        None, description="tokens to generate at most; -1, 0 or absent: until the model stops or "
                          "the context is full; -2: fill the context")
    top_k: Int | None = Field(None, description=f"default {DEFAULT_TOP_K}; 0: off")
    top_p: Num | None = Field(None, description=f"default {DEFAULT_TOP_P}")
    min_p: Num | None = Field(None, description=f"default {DEFAULT_MIN_P}")
    typical_p: Num | None = Field(None, description="ignored")
    tfs_z: Num | None = Field(None, description="ignored")
    repeat_last_n: Int | None = Field(
        None, description="0 turns the penalties off; any other value: they apply to the whole "
                          "context (ember has no penalty window)")
    temperature: Num | None = Field(None, description=f"default {DEFAULT_TEMPERATURE}; 0: greedy")
    repeat_penalty: Num | None = Field(None, description=f"default {DEFAULT_REPEAT_PENALTY}")
    presence_penalty: Num | None = None
    frequency_penalty: Num | None = None
    mirostat: Int | None = Field(None, description="ignored")
    mirostat_tau: Num | None = Field(None, description="ignored")
    mirostat_eta: Num | None = Field(None, description="ignored")
    penalize_newline: Bool | None = Field(None, description="ignored")
    stop: list[str] | str | None = None
    num_ctx: Int | None = Field(
        None, description="context window; capped at the context the server was started with")
    numa: Bool | None = None
    num_batch: Int | None = None
    num_gpu: Int | None = None
    main_gpu: Int | None = None
    low_vram: Bool | None = None
    vocab_only: Bool | None = None
    use_mmap: Bool | None = None
    use_mlock: Bool | None = None
    num_thread: Int | None = None


FormatField = Annotated[
    Literal["", "json"] | dict[str, Any] | None,
    Field(None, description='"json" for any JSON object, or a JSON schema the output must match'),
]


class _Request(BaseModel):
    # Ollama ignores fields it does not know (newer clients send newer fields).
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)


class _Sampled(_Request):
    """What generate and chat share."""

    stream: bool = True
    format: FormatField
    options: OllamaOptions | None = None
    keep_alive: float | str | None = Field(None, description="accepted and ignored")
    think: bool | str | None = Field(None, description="not supported: true is a 400")

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if value is None or value in ("", "json") or isinstance(value, dict):
            return value
        raise ValueError('format must be "json" or a JSON schema object')


class OllamaGenerateRequest(_Sampled):
    prompt: str | None = None
    suffix: str | None = Field(None, description="not supported: a non-empty suffix is a 400")
    system: str | None = None
    template: str | None = Field(
        None, description="ignored: ember renders the model's own (Jinja) chat template")
    context: list[int] | None = Field(
        None, description="token ids from a previous response's `context`, put before the prompt")
    raw: bool = False
    images: list[str] | None = Field(None, description="not supported: images are a 400")


class OllamaToolCallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    function: OllamaToolCallFunction


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = Field(None, description="not supported: images are a 400")
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaChatRequest(_Sampled):
    messages: list[OllamaMessage] | None = Field(
        None, description="absent or empty: load the model and return at once, as Ollama does")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: tools are a 400")


class OllamaShowRequest(_Request):
    model: str = Field("", description="the model's name")
    name: str | None = Field(None, description="deprecated spelling of `model`")
    verbose: bool = False


class OllamaPullRequest(_Request):
    model: str = Field("", description="a catalogue name, a .gguf path on the server, or "
                                       "hf:OWNER/REPO/FILE.gguf")
    name: str | None = Field(None, description="deprecated spelling of `model`")
    insecure: bool = Field(False, description="ignored")
    stream: bool = True


class OllamaErrorResponse(BaseModel):
    error: str


class _Stats(BaseModel):
    done: bool
    done_reason: str | None = None
    total_duration: int | None = Field(None, description="nanoseconds, from request to end")
    load_duration: int | None = Field(
        None, description="nanoseconds before the engine started on the request (templating, "
                          "tokenising, queueing); the model is always loaded")
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = Field(None, description="nanoseconds")
    eval_count: int | None = None
    eval_duration: int | None = Field(None, description="nanoseconds")


class OllamaGenerateResponse(_Stats):
    model: str
    created_at: str
    response: str
    context: list[int] | None = None


class OllamaResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class OllamaChatResponse(_Stats):
    model: str
    created_at: str
    message: OllamaResponseMessage


class OllamaModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class OllamaListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaListResponse(BaseModel):
    models: list[OllamaListedModel]


class OllamaRunningModel(OllamaListedModel):
    expires_at: str
    size_vram: int
    context_length: int


class OllamaProcessResponse(BaseModel):
    models: list[OllamaRunningModel]


class OllamaShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    license: str | None = None


class OllamaProgressResponse(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaVersionResponse(BaseModel):
    version: str


_ERRORS = {
    400: {"model": OllamaErrorResponse, "description": "invalid request"},
    404: {"model": OllamaErrorResponse, "description": "model not found"},
}


def _streamed(model: type[BaseModel], what: str) -> dict:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        200: {"model": model,
              "description": f"{what}: one JSON object, or with stream true (the default) NDJSON, "
                             "one object per line, the last with done true and the timings",
              "content": {NDJSON: {"schema": schema}}},
        **_ERRORS,
        500: {"model": OllamaErrorResponse, "description": "structured output failed"},
        503: {"model": OllamaErrorResponse, "description": "server busy or engine stopped"},
    }
