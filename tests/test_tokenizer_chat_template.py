"""tinylm.tokenizer chat templates against transformers' apply_chat_template (the models' real templates, tools,
its Jinja environment), and the one-line TemplateError for raised, sandbox-escaping and broken templates."""

from __future__ import annotations

import datetime

import pytest
from tokenizers import Tokenizer as Backend

from tests.tokenizer_helpers import (CHAT_CASES, LLAMA_TOOL_CHAT, QWEN25_TEMPLATE, SMOLLM2_TEMPLATE, SYSTEM_CHAT,
                                     TOOLS, USER_CHAT, ZEPHYR_TEMPLATE, _backend, _write_folder)
from tinylm import chat_template
from tinylm.errors import TemplateError
from tinylm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


# --- chat templates

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("family", "messages", "tools", "variables"), CHAT_CASES)
def test_chat_template_matches_transformers(pairs, family, messages, tools, variables, add_generation_prompt):
    ours, theirs = pairs[family]
    args = dict(add_generation_prompt=add_generation_prompt, tools=tools, **variables)
    text = ours.apply_chat_template(messages, **args)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **args)
    ids = ours.apply_chat_template(messages, tokenize=True, **args)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **args)
    assert ids == ours.encode(text, add_special_tokens=False)  # the template's own BOS only, never a second one


def test_strftime_now_gives_today(pairs):
    ours, theirs = pairs["llama3"]
    text = ours.apply_chat_template(USER_CHAT)
    assert datetime.date.today().strftime("Today Date: %d %b %Y") in text
    assert text == theirs.apply_chat_template(USER_CHAT, tokenize=False, add_generation_prompt=True)


def test_continue_final_message_matches_transformers(pairs):
    ours, theirs = pairs["qwen2"]
    messages = SYSTEM_CHAT + [{"role": "assistant", "content": "The answer is"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    assert text == theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def test_named_templates_and_template_files_like_transformers(tmp_path, trained):
    """A list of templates in the config picks "tool_use" when tools are given; chat_template.jinja overrides."""
    config = {"eos_token": "<|im_end|>", "chat_template": [{"name": "default", "template": SMOLLM2_TEMPLATE},
                                                           {"name": "tool_use", "template": QWEN25_TEMPLATE}]}
    folder = _write_folder(tmp_path, _backend("qwen2", trained), config)

    def both(**kw):
        ours, theirs = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
        text = ours.apply_chat_template(USER_CHAT, **kw)
        assert text == theirs.apply_chat_template(USER_CHAT, tokenize=False, add_generation_prompt=True, **kw)
        return text

    assert "SmolLM" in both() and "<tools>" in both(tools=TOOLS)
    (folder / "chat_template.jinja").write_text(ZEPHYR_TEMPLATE)
    assert both().startswith("<|user|>\n")


ENVIRONMENT_TEMPLATES = [  # each exercises one feature of transformers' Jinja environment
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n        [{{ m.content }}]\n    {% endif %}\n{% endfor %}",
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}"
    "{% endif %}{{ m.role }};{% endfor %}",
    "{{ messages | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}|"
    "{{ tools | tojson(separators=(',', ':')) }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content | length %}{% endfor %}"
    "{{ ns.n }} {{ dict(a=1, b=bos_token) | tojson }} {{ dict.fromkeys(['x']) | tojson }}",
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ custom_flag }}",
    "{% for m in messages %}({{ m.content is defined }},{{ m.reasoning_content }},{{ m.thinking }}){% endfor %}",
]
ENVIRONMENT_CHAT = [
    {"role": "system", "content": "Sé breve. 日本"},
    {"role": "user", "content": "Hi <tag> & \"quotes\""},
    {"role": "assistant", "content": None, "reasoning": "thinking about it"},  # None is dropped; reasoning aliased
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize("template", ENVIRONMENT_TEMPLATES)
def test_jinja_environment_matches_transformers(pairs, template):
    ours, theirs = pairs["smollm2"]
    args = dict(chat_template=template, tools=TOOLS, custom_flag="on", add_generation_prompt=False)
    text = ours.apply_chat_template(ENVIRONMENT_CHAT, **args)
    assert text == theirs.apply_chat_template(ENVIRONMENT_CHAT, tokenize=False, **args)
    assert text.strip()


def test_raise_exception_becomes_template_error(pairs):
    ours, _ = pairs["qwen2"]
    with pytest.raises(TemplateError, match="only user and assistant roles are supported") as err:
        ours.apply_chat_template(USER_CHAT, chat_template="{{ raise_exception('only user and assistant roles\\n"
                                                           "are supported') }}")
    assert "\n" not in str(err.value)  # one line, for the CLI and HTTP errors
    with pytest.raises(TemplateError, match="single tool-calls"):  # the Llama-3.2 template's own check
        pairs["llama3"][0].apply_chat_template(LLAMA_TOOL_CHAT[:2] + [
            {"role": "assistant", "tool_calls": LLAMA_TOOL_CHAT[2]["tool_calls"] * 2}], tools=TOOLS)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ dict.__class__ }}{{ dict.__class__.__base__ }}",
])
def test_sandbox_escape_raises_template_error(pairs, template):
    ours, _ = pairs["qwen2"]
    with pytest.raises(TemplateError, match="sandbox") as err:
        ours.apply_chat_template(USER_CHAT, chat_template=template)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("template", "match"), [
    ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ undefined_thing.attribute }}", "undefined"),
])
def test_broken_templates_raise_template_error(pairs, template, match):
    with pytest.raises(TemplateError, match=match):
        pairs["qwen2"][0].apply_chat_template(USER_CHAT, chat_template=template)


def test_old_jinja_is_refused(pairs, monkeypatch):
    monkeypatch.setattr(chat_template, "_JINJA_IS_SAFE", False)
    chat_template.compile_template.cache_clear()
    with pytest.raises(TemplateError, match="jinja2 >= 3.1.6"):
        pairs["qwen2"][0].apply_chat_template(USER_CHAT)
    chat_template.compile_template.cache_clear()


def test_no_template_raises_template_error(trained):
    with pytest.raises(TemplateError, match="no default chat template"):
        Tokenizer(Backend.from_str(trained["byte_level"])).apply_chat_template(USER_CHAT)


def test_template_sees_plain_data_only(pairs):
    """Caller objects reach the template rebuilt as JSON types (an enum's str value, not the enum)."""
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    text = pairs["smollm2"][0].apply_chat_template([{"role": Role.USER, "content": "hi"}], add_generation_prompt=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")
