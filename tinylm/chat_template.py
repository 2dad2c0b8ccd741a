"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

Chat templates come from model repos: they are untrusted code. They run in Jinja's ImmutableSandboxedEnvironment with
the same options, filters and globals as transformers (`_cached_compile_jinja_template` and `render_jinja_template` in
transformers/utils/chat_template_utils.py), so a template renders the same text here as there, and the inputs are
rebuilt from plain JSON types first, so no object with dangerous methods reaches the template.

Templates also come from requests (when a server allows it), so a render has a budget: a time limit that also stops
pure-Python loops (a watchdog raises an exception in the rendering thread), an output limit, and size checks on the
operations that could allocate far more than the output limit in one step (`'a' * 10**9`, `2 ** 10**9`, a `~` or
`+` that doubles a string, a filter or str method with a huge width). Any overrun is a one-line TemplateError.
The limits are tinylm/template_budget.py (sizes) and tinylm/template_guard.py (the environment, the time limit).
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
from jinja2.sandbox import SecurityError

from tinylm.errors import TemplateError
from tinylm.template_budget import (BUDGET, FILTER_CHECKS, MAX_TEMPLATE_CHARS, MIN_OUTPUT_LIMIT,
                                    OUTPUT_LIMIT_PER_INPUT, RENDER_TIME_LIMIT_S, WORK_LIMIT_PER_OUTPUT, Budget,
                                    OverBudget, checked_filter, checked_lipsum, text_size)
from tinylm.template_guard import BudgetedEnvironment, finalize, within_time_limit

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
    if re.search(r"%[-_0^#]*\d{4,}", format):  # glibc pads to any width: "%1000000000Y" is a gigabyte
        raise OverBudget("a strftime width of 1000 or more")
    return datetime.now().strftime(format)


def _environment() -> BudgetedEnvironment:
    env = BudgetedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    for name in FILTER_CHECKS:
        env.filters[name] = checked_filter(name, env.filters[name])
    env.finalize = finalize
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace, lipsum=checked_lipsum)
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


# Roles every template may see; a template's own string literals ('developer', 'ipython') add to them
STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool"})
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@lru_cache(maxsize=32)
def template_roles(source: str) -> frozenset[str]:
    """The roles a message may have with this template: STANDARD_ROLES, plus every string literal in the template
    that could be a role name (a plain identifier), e.g. 'developer', 'ipython' or 'function'."""
    literals = {node.value for node in _ENV.parse(source).find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return STANDARD_ROLES | {name for name in literals if _ROLE_NAME.fullmatch(name)}


def _prepare_messages(messages: list, roles: frozenset[str]) -> list[dict]:
    """Drop None values (OpenAI clients send `content=None`), rebuild as plain data, alias reasoning fields; refuse
    roles the template does not know (a role is written into the prompt as is: "user\n<|im_start|>system" would
    open a turn of its own)."""
    chat = []
    for index, message in enumerate(plain_data(messages)):
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        _check_role(index, message.get("role"), roles)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # gpt-oss templates read `thinking`, the rest `reasoning_content`
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _check_role(index: int, role: Any, roles: frozenset[str]) -> None:
    if role is None:
        raise TemplateError(f"message {index} has no role")
    if not isinstance(role, str):
        raise TemplateError(f"message {index} has a role of type {type(role).__name__}; roles are strings")
    if not _ROLE_NAME.fullmatch(role):
        raise TemplateError(f"message {index} has the role {role[:40]!r}; a role is a plain name such as 'user'")
    if role not in roles:
        raise TemplateError(f"message {index} has the role {role!r}, which this chat template does not use "
                            f"(it knows {', '.join(sorted(roles))})")


def render(source: str, messages: list, *, tools: list | None = None, documents: list | None = None,
           add_generation_prompt: bool = False, continue_final_message: bool = False,
           time_limit: float = RENDER_TIME_LIMIT_S, output_limit: int | None = None, **variables) -> str:
    """Render `messages` with the template `source`. Every failure becomes a one-line TemplateError, and so does a
    render that runs past `time_limit` seconds or writes more than `output_limit` characters (default:
    max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT x the size of messages, tools, documents and variables as text)).
    Safe to call from any thread, the main one included."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template is {len(source)} characters long, more than {MAX_TEMPLATE_CHARS}")
    if continue_final_message and add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt cannot be used together")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TemplateError("tools must be JSON-schema dicts")

    def work() -> str:
        template, roles = compile_template(source), template_roles(source)
        try:
            chat = _prepare_messages(messages, roles)
            inputs = dict(tools=plain_data(tools), documents=plain_data(documents), **plain_data(variables))
        except RecursionError:
            raise TemplateError("chat messages are nested too deeply") from None
        if continue_final_message:
            _tag_final_message(chat)
        limit = output_limit or max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT * text_size((chat, inputs), 1 << 62))
        text = _render_within(template, Budget(limit, limit * WORK_LIMIT_PER_OUTPUT),
                              dict(messages=chat, add_generation_prompt=add_generation_prompt, **inputs))
        return _cut_at_tag(text) if continue_final_message else text

    return within_time_limit(time_limit, work)


def _render_within(template: jinja2.Template, budget: Budget, context: dict) -> str:
    """The rendered text, counted as it is produced: it stops at the budget's limit, not after building it all."""
    parts, chunks, size = [], [], 0
    token = BUDGET.set(budget)
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            budget.check(size, "the rendered text")
            budget.produce(len(chunk) + 1)
            chunks.append(chunk)
            if len(chunks) == 4096:  # a million one-character chunks would take 50 MB as separate objects
                parts.append("".join(chunks))
                chunks.clear()
    except OverBudget as e:
        raise TemplateError(f"chat template exceeded its output limit of {budget.limit} characters: {e}") from None
    except SecurityError as e:
        raise TemplateError(_one_line(f"chat template sandbox violation: {e}")) from None
    except jinja2.TemplateError as e:  # raise_exception(...) and undefined values
        raise TemplateError(_one_line(f"chat template failed: {e}")) from None
    except Exception as e:  # any Python error inside the template (a bad comparison, a missing key)
        raise TemplateError(_one_line(f"chat template failed to render: {type(e).__name__}: {e}")) from None
    finally:
        BUDGET.reset(token)
    return "".join(parts) + "".join(chunks)


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
