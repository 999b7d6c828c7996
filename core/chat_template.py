"""Rendering a model's chat template: Jinja in a sandbox, with the globals transformers provides.

A chat template ships inside the model file, so it is untrusted code. The immutable sandbox
blocks attribute tricks (`''.__class__.__mro__`) and mutation of the inputs; on top of it we cap
the render's time and output so that a template cannot hang or exhaust the server either.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

ROLES = ("system", "user", "assistant", "tool")

# For a model whose file has no template: ChatML, which most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

RENDER_TIMEOUT_S = 5.0
MAX_OUTPUT_CHARS = 16 * 1024 * 1024


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    timeout_s: float = RENDER_TIMEOUT_S,
    **kwargs: Any,
) -> str:
    """The prompt text for a conversation. Extra keyword arguments (tools, documents,
    enable_thinking, ...) are passed to the template as variables. Raises ValueError for bad
    messages and for a template that fails, raises, or runs past its limits."""
    chat = validate_messages(messages)
    context = {"tools": None, "documents": None}
    context.update((key, _plain(value, key)) for key, value in kwargs.items())
    context.update(messages=chat, add_generation_prompt=bool(add_generation_prompt),
                   bos_token=bos_token, eos_token=eos_token)
    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    pieces: list[str] = []
    size = 0
    try:
        with _time_limit(timeout_s):
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"output exceeds {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
    except _TemplateRaised as exc:
        raise ValueError(f"chat template raised an error: {exc}") from None
    except Exception as exc:  # a template is code: anything it does wrong is the template's fault
        raise ValueError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    return "".join(pieces)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain copies of the messages, after checking their shape. The copies also keep the
    template away from the caller's own objects and whatever methods they carry."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, not {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}]['role'] must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        calls_tools = role == "assistant" and content is None and message.get("tool_calls")
        if not isinstance(content, str) and not calls_tools:
            raise ValueError(
                f"messages[{i}]['content'] must be a string, not {type(content).__name__} "
                "(flatten multi-part content to text first)")
        checked.append(_plain(message, f"messages[{i}]"))
    return checked


# -- the sandbox --------------------------------------------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(...)` in a template throws."""


class _Sandbox(ImmutableSandboxedEnvironment):
    # Repetition and powers are the cheap ways to allocate or compute without bound.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "*":
            seq, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                    and len(seq) * count > MAX_OUTPUT_CHARS:
                raise SecurityError("repetition is too large")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja would render the forbidden attribute as empty text; a template that reaches for
        # one is broken or hostile, and we say so.
        raise SecurityError(f"access to attribute {attribute!r} of a "
                            f"{type(obj).__name__!r} object is unsafe")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks
    (transformers' AssistantTracker); for inference only its body matters."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, > and &, which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"chat template does not parse (line {exc.lineno}): {exc.message}") from None


# -- limits -------------------------------------------------------------------------------------

_state = threading.local()


def _check_deadline() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError("rendering took too long")


def _trace_calls(frame: Any, event: str, arg: Any) -> Any:
    # Line-trace only the compiled template's own frames: a nested loop there calls nothing we
    # could hook, so its lines are where the deadline has to be checked.
    return _trace_lines if frame.f_code.co_filename == "<template>" else None


def _trace_lines(frame: Any, event: str, arg: Any) -> Any:
    if event == "line":
        _check_deadline()
    return _trace_lines


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    _state.deadline = time.monotonic() + seconds
    # A debugger or coverage tool already tracing keeps its tracer; then only the sandbox's call
    # and operator hooks check the deadline.
    trace = sys.gettrace() is None
    if trace:
        sys.settrace(_trace_calls)
    try:
        yield
    finally:
        if trace:
            sys.settrace(None)
        _state.deadline = None


def _plain(value: Any, where: str) -> Any:
    """`value` rebuilt from JSON types only."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (str enums, ...) bring methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            out[str.__str__(key)] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{k}]") for k, item in enumerate(value)]
    raise ValueError(f"{where}: {type(value).__name__} values cannot be passed to a chat template")
