"""Tool-call formats and reasoning markers: parsed whole and streamed in any split, rendered for templates with and
without tools, and forced-call grammars that accept exactly the calls they should."""

from __future__ import annotations

import json

import llguidance
import pytest

from tinylm.reasoning import ReasoningFormat, ReasoningStream, reasoning_format
from tinylm.tool_calls import (HERMES, LLAMA3_JSON, ToolCallStream, call_grammar, messages_for_template,
                               parse_tool_calls, template_tool_format)
from tinylm.tiny import build_tokenizer

QWEN_TEMPLATE = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>{% if enable_thinking %}</think>"
LLAMA_TEMPLATE = '{% if tools %}Environment: ipython {"name": ..., "parameters": ...}{% endif %}<|python_tag|>'
HERMES_REPLY = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n[{"name": "get_time", "arguments": {"city": "Oslo"}}]\n</tool_call>')


def _stream(parser, text: str, size: int):
    pieces = [parser.push(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    return pieces


def test_formats_are_read_from_the_template():
    assert template_tool_format(QWEN_TEMPLATE) == HERMES
    assert template_tool_format(LLAMA_TEMPLATE) == LLAMA3_JSON
    assert template_tool_format("{{ messages }}") is None
    assert reasoning_format(QWEN_TEMPLATE) is not None and reasoning_format(LLAMA_TEMPLATE) is None


def test_hermes_calls_parse_whole_and_streamed():
    content, calls = parse_tool_calls(HERMES_REPLY, HERMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                   ("get_time", {"city": "Oslo"})]
    for size in (1, 3, 7, 1000):
        pieces = _stream(ToolCallStream(HERMES), HERMES_REPLY, size)
        assert "".join(text for text, _ in pieces).strip() == "Let me check."
        assert [c.name for _, found in pieces for c in found] == ["get_weather", "get_time"]


def test_a_reply_cut_short_keeps_its_whole_calls():
    content, calls = parse_tool_calls(HERMES_REPLY[:-30], HERMES)
    assert [c.name for c in calls] == ["get_weather"] and "<tool_call>" in content
    assert parse_tool_calls('<tool_call>{"name": oops}</tool_call>', HERMES) == (
        '<tool_call>{"name": oops}</tool_call>', [])  # not JSON: all content, as vLLM does


def test_llama3_calls_parse():
    text = '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}'
    content, calls = parse_tool_calls(text, LLAMA3_JSON)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}'), ("g", "{}")]
    assert parse_tool_calls("Just text.", LLAMA3_JSON) == ("Just text.", [])
    pieces = _stream(ToolCallStream(LLAMA3_JSON), text, 4)
    assert [c.name for _, found in pieces for c in found] == ["f", "g"]


@pytest.mark.parametrize("text,opening,expected", [
    ("<think>\nhmm\n</think>\n\nYes.", "model", ("hmm", "Yes.")),
    ("Yes.", "model", (None, "Yes.")),
    ("hmm</think>Yes.", "open", ("hmm", "Yes.")),
    ("<think>cut short", "model", ("cut short", "")),
    ("<think>x</think>y", "closed", (None, "<think>x</think>y")),
])
def test_reasoning_splits_whole_and_streamed(text, opening, expected):
    fmt = ReasoningFormat()
    assert fmt.split(text, opening) == expected
    for size in (1, 2, 5):
        pieces = _stream(ReasoningStream(fmt, opening), text, size)
        reasoning = "".join(r for r, _ in pieces).strip() or None
        assert (reasoning, "".join(a for _, a in pieces)) == expected


def test_reasoning_opening_is_read_from_the_prompt():
    fmt = ReasoningFormat()
    assert fmt.opening("<|im_start|>assistant\n<think>\n") == "open"
    assert fmt.opening("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"
    assert fmt.opening("<|im_start|>assistant\n") == "model"


def test_templates_without_tools_get_them_as_text():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    plain = messages_for_template(history, tools, "{{ messages }}")
    assert plain[0]["role"] == "system" and '"name": "f"' in plain[0]["content"]
    assert plain[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert plain[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    templated = messages_for_template(history, tools, QWEN_TEMPLATE)
    assert templated[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}  # an object, as templates expect


def test_forced_call_grammars_accept_only_valid_calls():
    tokenizer = build_tokenizer()
    llg = llguidance.LLTokenizer(tokenizer.backend.to_str())
    functions = [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"], "additionalProperties": False}},
                 {"name": "g"}]

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(llg, llguidance.LLMatcher.grammar_from_lark(grammar))
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()

    one = call_grammar(functions, HERMES, parallel=False)
    assert accepts(one, '<tool_call>\n{"name": "f", "arguments": {"a": 3}}\n</tool_call>')
    assert not accepts(one, '<tool_call>\n{"name": "f", "arguments": {"a": "x"}}\n</tool_call>')
    assert not accepts(one, '<tool_call>\n{"name": "h", "arguments": {}}\n</tool_call>')
    two = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n' \
          '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert accepts(call_grammar(functions, HERMES, parallel=True), two) and not accepts(one, two)
    assert accepts(call_grammar(functions, LLAMA3_JSON, parallel=False), '{"name": "f", "parameters": {"a": 2}}')
