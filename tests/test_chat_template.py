"""Chat templates: rendered as transformers renders them, inside a sandbox that holds."""
from __future__ import annotations

import sys
import time
from datetime import datetime

import pytest

from ember.chat_template import CHATML_TEMPLATE, render_chat_template, validate_messages
from ember.tokenizer import Tokenizer
from test_tokenizer import smollm2_metadata, smollm2_reference

USER = [{"role": "user", "content": "Hi"}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Ahoy?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3? 🤔"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces \n\n newlines\t"}],
    [{"role": "user", "content": "<b>html & \"quotes\"</b> {{ not jinja }} {% raw %}"}],
]


@pytest.fixture(scope="module")
def smol_template() -> str:
    return Tokenizer.from_gguf_metadata(smollm2_metadata()).chat_template


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smol_template, messages, add_generation_prompt):
    expected = smollm2_reference().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat_template(smol_template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert got == expected


def test_chatml_fallback():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat_template(None, messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = render_chat_template(None, messages, add_generation_prompt=False)
    assert no_prompt.endswith("U<|im_end|>\n")
    assert render_chat_template(None, messages) == render_chat_template(CHATML_TEMPLATE, messages)


def test_globals_filters_and_variables():
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ messages[0]['content'] | tojson }}"
        "|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=True) }}|{{ strftime_now('%Y') }}"
        "|{{ tools | length }}|{{ enable_thinking }}|{{ documents is none }}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% endfor %}"
        "{% generation %}|gen{% endgeneration %}"
    )
    got = render_chat_template(
        template, [{"role": "user", "content": "<é & \"x\">"}], bos_token="<s>", eos_token="</s>",
        tools=[{"name": "f"}], enable_thinking=False)
    year = datetime.now().strftime("%Y")
    assert got == f'<s>|</s>|"<é & \\"x\\">"|{{"a": [1, 2], "b": 1}}|{year}|1|False|True|gen'


def test_whitespace_control_like_transformers():
    # trim_blocks and lstrip_blocks: block tags do not leave their newlines and indentation
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
                "    {% endif %}\n{% endfor %}")
    assert render_chat_template(template, USER * 2) == "[Hi]\n[Hi]\n"


def test_template_raising_is_a_value_error():
    template = ("{% if messages[0]['role'] != 'system' %}"
                "{{ raise_exception('need a system prompt') }}{% endif %}")
    with pytest.raises(ValueError, match="need a system prompt"):
        render_chat_template(template, USER)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ (messages | first).items.__self__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{% set x = messages[0].update({'content': 'x'}) %}",
    "{{ messages[0].pop('content') }}",
    "{{ 'a' * 10**9 }}",
    "{{ 2 ** 100000000 }}",
    "{{ lipsum.__globals__['os'] }}",
])
def test_sandbox_blocks_escapes_and_mutation(template):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "Hi"}]


def test_long_loops_hit_the_time_limit():
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ValueError, match="too long"):
        render_chat_template(template, USER, timeout_s=0.2)
    assert time.monotonic() - start < 5


@pytest.mark.skipif(sys.gettrace() is not None, reason="a debugger or coverage tracer is active")
def test_loops_that_call_nothing_hit_the_time_limit():
    template = ("{% set xs = range(100000) | list %}"
                "{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(ValueError, match="too long"):
        render_chat_template(template, USER, timeout_s=0.2)
    assert time.monotonic() - start < 5
    assert sys.gettrace() is None  # the tracer is gone again


def test_unbounded_recursion_is_a_value_error():
    with pytest.raises(ValueError, match="RecursionError"):
        render_chat_template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", USER)


def test_syntax_error_is_a_value_error():
    with pytest.raises(ValueError, match="does not parse"):
        render_chat_template("{% for m in messages %}", USER)


@pytest.mark.parametrize("messages, message", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    (None, "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\] must be one of"),
    ([{"role": "robot", "content": "hi"}], "got 'robot'"),
    ([{"role": "user"}], "must be a string, not NoneType"),
    ([{"role": "user", "content": 3}], "must be a string, not int"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "flatten multi-part"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": None}], r"messages\[1\]"),
    ([{"role": "user", "content": "hi", "extra": object()}], "object values cannot"),
    ([{"role": "user", "content": "hi", 3: "x"}], "keys must be strings"),
])
def test_bad_messages_are_rejected(messages, message):
    with pytest.raises(ValueError, match=message):
        render_chat_template(None, messages)


def test_messages_are_plain_copies():
    class Role(str):
        def shout(self):
            return "!"

    tool_call = {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    messages = [{"role": Role("user"), "content": "hi"}, tool_call]
    checked = validate_messages(messages)
    assert type(checked[0]["role"]) is str and checked[0] is not messages[0]
    assert checked[1]["tool_calls"] == tool_call["tool_calls"]
    with pytest.raises(ValueError):
        render_chat_template("{{ messages[0].role.shout() }}", messages)
