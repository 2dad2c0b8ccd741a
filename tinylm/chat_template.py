"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

Chat templates come from model repos: they are untrusted code. They run in Jinja's ImmutableSandboxedEnvironment with
the same options, filters and globals as transformers (`_cached_compile_jinja_template` and `render_jinja_template` in
transformers/utils/chat_template_utils.py), so a template renders the same text here as there, and the inputs are
rebuilt from plain JSON types first, so no object with dangerous methods reaches the template.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from tinylm.errors import TemplateError

# Names a message's reasoning is passed under; templates read the first (transformers' `_REASONING_FIELDS`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Older Jinja releases have known sandbox escapes, and templates are untrusted: refuse them, as transformers does
_JINJA_IS_SAFE = tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3]) >= (3, 1, 6)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself (its attributes lead to Python internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could shadow internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON, as transformers gives them
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    if not _JINJA_IS_SAFE:
        raise TemplateError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes), "
                            f"this is {jinja2.__version__}")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(_one_line(f"chat template has a syntax error at line {e.lineno}: {e.message}")) from None


def plain_data(value: Any) -> Any:
    """Rebuild `value` out of JSON types; anything else becomes an inert "<TypeName>" string.

    Caller objects (enums, pydantic models, arrays) carry methods the sandbox does not know are dangerous.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)  # str.__str__, not str(): str(enum) is its name
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list) -> list[dict]:
    """Drop None values (OpenAI clients send `content=None`), rebuild as plain data, alias reasoning fields."""
    chat = []
    for message in plain_data(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # gpt-oss templates read `thinking`, the rest `reasoning_content`
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def render(source: str, messages: list, *, tools: list | None = None, documents: list | None = None,
           add_generation_prompt: bool = False, continue_final_message: bool = False, **variables) -> str:
    """Render `messages` with the template `source`. Every failure becomes a one-line TemplateError."""
    template = compile_template(source)
    chat = _prepare_messages(messages)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TemplateError("tools must be JSON-schema dicts")
    if continue_final_message:
        if add_generation_prompt:
            raise TemplateError("continue_final_message and add_generation_prompt cannot be used together")
        _tag_final_message(chat)
    try:
        text = template.render(messages=chat, tools=plain_data(tools), documents=plain_data(documents),
                               add_generation_prompt=add_generation_prompt, **plain_data(variables))
    except SecurityError as e:
        raise TemplateError(_one_line(f"chat template sandbox violation: {e}")) from None
    except jinja2.TemplateError as e:  # raise_exception(...) and undefined values
        raise TemplateError(_one_line(f"chat template failed: {e}")) from None
    except Exception as e:  # any Python error inside the template (a bad comparison, a missing key)
        raise TemplateError(_one_line(f"chat template failed to render: {type(e).__name__}: {e}")) from None
    return _cut_at_tag(text) if continue_final_message else text


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


def _tag_final_message(chat: list[dict]) -> None:
    """Mark the end of the last message's content so the rendered text can be cut there (to prefill a reply)."""
    content = chat[-1].get("content") if chat else None
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return
    blocks = [b for b in content or () if isinstance(b, dict) and "text" in b]
    if not blocks:
        raise TemplateError("continue_final_message needs a final message with text content")
    blocks[-1]["text"] += _CONTINUE_TAG


def _cut_at_tag(text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise TemplateError("continue_final_message: the template dropped the final message's content")
    at = text.rindex(tag)
    # A template that strips the content also strips the space we added after the tag, and the message's own
    # trailing space: cut that too (transformers does the same)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
