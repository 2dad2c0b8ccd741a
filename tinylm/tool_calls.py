"""Tool calling: tools into the prompt, the model's calls out of its reply, and the grammar that forces a call.

A model writes calls in the format its chat template taught it; tinylm knows two, detected from the template:
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen2.5, Qwen3,
  Hermes; SmolLM2 writes a JSON list of calls inside one block, which parses too);
- "llama3_json": a bare `{"name": ..., "parameters": {...}}` object, after `<|python_tag|>` or not (Llama 3.1-3.3).
A template that never mentions tools (SmolLM2-135M-Instruct's) gets the tools described in its system message and
earlier calls and results written out as text in the hermes format, so a forced call (tool_choice "required" or a
named function, output constrained by the grammar from `call_grammar`) still shows the model what it may call; such
a model cannot take tool_choice "auto", as nothing taught it when to call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tinylm.reasoning import partial_suffix

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MAX_PARALLEL_CALLS = 8  # calls one forced reply may hold (parallel_tool_calls), at most one per function offered


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def template_tool_format(template_source: str | None) -> str | None:
    """The call format a chat template renders (and so the model writes), or None when it renders no tools."""
    source = template_source or ""
    if TOOL_CALL_START in source:
        return HERMES
    if PYTHON_TAG in source or ("tools" in source and '"parameters"' in source):
        return LLAMA3_JSON
    return None


def renders_tools(template_source: str | None) -> bool:
    return "tools" in (template_source or "")


# --- the prompt

def tool_functions(tools: list[dict]) -> list[dict]:
    """The `function` objects of OpenAI's tools list."""
    return [tool["function"] for tool in tools]


def messages_for_template(messages: list[dict], tools: list[dict] | None, template_source: str | None) -> list[dict]:
    """Messages as the template can render them. Calls' `arguments` become objects (templates write them with
    tojson, as transformers documents). For a template that renders no tools: the tools described in the system
    message, earlier calls as hermes text in the assistant's content, tool results as user turns."""
    messages = [_arguments_as_objects(m) for m in messages]
    if renders_tools(template_source):
        return messages
    messages = [_as_text(m) for m in messages]
    if tools:
        messages = _with_tool_prompt(messages, tools)
    return messages


def _arguments_as_objects(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass  # kept as the client sent it
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _as_text(message: dict) -> dict:
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if message.get("tool_calls"):
        blocks = [_hermes_block(c["function"].get("name"), c["function"].get("arguments"))
                  for c in message["tool_calls"]]
        text = "\n".join(filter(None, [message.get("content") or "", *blocks]))
        return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}
    return message


def _hermes_block(name, arguments) -> str:
    return f"{TOOL_CALL_START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n" \
           f"{TOOL_CALL_END}"


def _with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    described = "\n".join(json.dumps(f, ensure_ascii=False) for f in tool_functions(tools))
    prompt = ("You may call these functions. To call one, reply with\n"
              f'{TOOL_CALL_START}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n'
              f"{TOOL_CALL_END}\nFunctions:\n{described}")
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{prompt}".strip()}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# --- forcing a call

def call_grammar(functions: list[dict], fmt: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance's, with `%json` for JSON schemas) whose sentences are calls of `functions` in the
    model's format, arguments valid against each function's parameters schema. With `parallel`, up to as many calls
    as functions (and MAX_PARALLEL_CALLS): small models otherwise repeat a call until max_tokens."""
    key = "parameters" if fmt == LLAMA3_JSON else "arguments"
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", key], "properties": {
        "name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}}} for f in functions]
    schema = json.dumps(variants[0] if len(variants) == 1 else {"anyOf": variants})
    if fmt == LLAMA3_JSON:
        return f"start: call\ncall: %json {schema}\n"
    extra_calls = min(len(functions), MAX_PARALLEL_CALLS) - 1 if parallel else 0
    repeat = f'("\\n" call){{0,{extra_calls}}}' if extra_calls else ""
    return (f"start: call {repeat}\n"
            f'call: "{TOOL_CALL_START}\\n" body "\\n{TOOL_CALL_END}"\n'
            f"body: %json {schema}\n")


# --- the reply

_HERMES_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_END) + r"|$)",
                           re.DOTALL)


def parse_tool_calls(text: str, fmt: str | None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply. A reply whose calls do not parse is all content (as vLLM's parsers do)."""
    try:
        if fmt == LLAMA3_JSON:
            return _parse_llama3(text)
        return _parse_hermes(text)
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []


def _parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    if TOOL_CALL_START not in text:
        return text, []
    calls, content = [], text
    for match in _HERMES_BLOCK.finditer(text):
        try:
            calls += _calls_of(json.loads(match.group(1)), "arguments")
        except ValueError:
            if match.group(0).endswith(TOOL_CALL_END):
                raise
            continue  # the last block, cut short by max_tokens: left in the content
        content = content.replace(match.group(0), "", 1)
    if not calls:
        return text, []
    return content.strip() or None, calls


def _parse_llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    body = body[len(PYTHON_TAG):] if body.startswith(PYTHON_TAG) else body
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in _json_objects(body):
        calls += _calls_of(part, "parameters")
    return None, calls


def _json_objects(text: str) -> list:
    """The JSON values of `text`, several separated by `;` or whitespace (Llama 3's parallel calls)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        while at < len(text) and text[at] in "; \n\t":
            at += 1
    return values


def _calls_of(value, key: str) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        arguments = item.get(key, item.get("arguments", item.get("parameters", {})))
        if not isinstance(item["name"], str):
            raise ValueError("a tool call's name must be a string")
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else
                              json.dumps(arguments, ensure_ascii=False)))
    return calls


class ToolCallStream:
    """Streamed answer text -> (content delta, calls completed by this delta). Content streams as it comes; from
    the first sign of a call the text is held until the call is complete (hermes: its end tag; llama3_json: the
    end of the reply)."""

    def __init__(self, fmt: str | None) -> None:
        self.fmt = fmt
        self.buffer = ""
        self.calling = False
        self.started = False  # any answer text seen (llama3_json calls must come first)

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.buffer += delta
        if self.fmt == LLAMA3_JSON:
            return self._push_llama3()
        return self._push_hermes()

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self.buffer = self.buffer, ""
        if not self.calling:
            return text, []
        content, calls = parse_tool_calls(text, self.fmt)
        return (content or "") if calls else text, calls

    def _push_hermes(self) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            if not self.calling:
                before, found, after = self.buffer.partition(TOOL_CALL_START)
                if not found:
                    cut = len(self.buffer) - partial_suffix(self.buffer, TOOL_CALL_START)
                    content, self.buffer = content + self.buffer[:cut], self.buffer[cut:]
                    return content, calls
                content, self.buffer, self.calling = content + before, found + after, True
            block, found, rest = self.buffer.partition(TOOL_CALL_END)
            if not found:
                return content, calls
            _, new_calls = parse_tool_calls(block + found, HERMES)
            if not new_calls:  # not a call after all: it is content
                content += block + found
            calls += new_calls
            self.buffer, self.calling = rest.lstrip("\n"), False

    def _push_llama3(self) -> tuple[str, list[ToolCall]]:
        if self.calling:
            return "", []
        stripped = self.buffer.lstrip()
        if not self.started and (stripped.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(stripped)):
            self.calling = bool(stripped)
            return "", []
        self.started = True
        text, self.buffer = self.buffer, ""
        return text, []
