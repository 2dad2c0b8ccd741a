"""What a chat request's reply holds besides text: tool calls (forced by a grammar or parsed from the model's own
format) and a reasoning model's thinking, for whole responses and for streams.

`plan_chat` reads the request and the chat template once (which tool format, whether the model reasons, the
grammar a forced call needs); `reply_message` builds a whole response's message from the generated text;
`ReplyStream` turns streamed text into OpenAI deltas (`reasoning_content`, `content`, `tool_calls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinylm.reasoning import ReasoningFormat, ReasoningStream, reasoning_format
from tinylm.sampling_params import StructuredOutputsParams
from tinylm.server.errors import APIError
from tinylm.tool_calls import (ToolCall, ToolCallStream, call_grammar, messages_for_template, parse_tool_calls,
                               renders_tools, template_tool_format, tool_functions)


@dataclass
class ChatPlan:
    tool_mode: str = "none"  # "none": no calls; "auto": parsed if the model writes one; "forced": grammar-held
    tool_format: str | None = None
    template_tools: list[dict] | None = None  # the tools the template renders itself
    tools: list[dict] = field(default_factory=list)
    constraint: StructuredOutputsParams | None = None  # the forced call's grammar
    reasoning: ReasoningFormat | None = None
    opening: str = "model"  # where the reply starts, against the rendered prompt (tinylm/reasoning.py)

    def messages(self, messages: list[dict], source: str) -> list[dict]:
        return messages_for_template(messages, self.tools or None, source)


def plan_chat(tokenizer, body, template_name: str | None) -> ChatPlan:
    """The request's tool mode, format and grammar, and whether the model reasons. APIError 400 for a tool choice
    that cannot be honoured."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    source = tokenizer.template_source(template_name, tools or None) if tokenizer is not None else ""
    plan = ChatPlan(tools=tools, reasoning=reasoning_format(source), tool_format=template_tool_format(source),
                    template_tools=tools or None if renders_tools(source) else None)
    if choice == "none":
        return plan
    if choice == "auto":
        if plan.tool_format is None:
            raise APIError(400, "this model's chat template has no tool-call format, so it cannot choose when to "
                           "call (tool_choice \"auto\"); use tool_choice \"required\" or name a function, and the "
                           "call is generated to match the function's schema", param="tool_choice")
        plan.tool_mode = "auto"
        return plan
    functions = _chosen_functions(tools, choice)
    if body.constraint() is not None:
        raise APIError(400, "a forced tool call cannot be combined with response_format or another output "
                       "constraint", param="tool_choice")
    plan.tool_mode = "forced"
    plan.constraint = StructuredOutputsParams(
        grammar=call_grammar(functions, plan.tool_format, body.parallel_tool_calls and choice == "required"))
    return plan


def _chosen_functions(tools: list[dict], choice) -> list[dict]:
    functions = tool_functions(tools)
    if choice == "required":
        return functions
    chosen = [f for f in functions if f["name"] == choice.function.name]
    if not chosen:
        raise APIError(400, f"tool_choice names the function `{choice.function.name}`, which is not in tools",
                       param="tool_choice")
    return chosen


def reply_message(plan: ChatPlan, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """(the assistant message, its finish_reason) of a whole reply."""
    reasoning, answer = plan.reasoning.split(text, plan.opening) if plan.reasoning else (None, text)
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if plan.tool_mode == "none":
        return message, finish_reason
    content, calls = parse_tool_calls(answer, plan.tool_format)
    if not calls:
        return message, finish_reason
    message.update(content=content, tool_calls=[call.openai() for call in calls])
    return message, called_finish_reason(finish_reason, called=True)


def called_finish_reason(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's finish_reason for a reply that ended by itself after calling tools: "tool_calls" (a reply cut by
    max_tokens stays "length")."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


class ReplyStream:
    """One choice's streamed text -> OpenAI chat deltas."""

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self.reasoning = ReasoningStream(plan.reasoning, plan.opening) if plan.reasoning else None
        self.tools = ToolCallStream(plan.tool_format) if plan.tool_mode != "none" else None
        self.num_calls = 0

    def push(self, text: str, finished: bool) -> list[dict]:
        """The deltas for this piece of text (at the end: everything still held back)."""
        thought, answer = self.reasoning.push(text) if self.reasoning else ("", text)
        if finished and self.reasoning:
            more_thought, more_answer = self.reasoning.finish()
            thought, answer = thought + more_thought, answer + more_answer
        deltas = [{"reasoning_content": thought}] if thought else []
        content, calls = self.tools.push(answer) if self.tools else (answer, [])
        if finished and self.tools:
            more_content, more_calls = self.tools.finish()
            content, calls = content + more_content, calls + more_calls
        if content:
            deltas.append({"content": content})
        return deltas + [delta for call in calls for delta in self._call_deltas(call)]

    def _call_deltas(self, call: ToolCall) -> list[dict]:
        """A call as OpenAI streams one: its id and name first, then its arguments."""
        index, self.num_calls = self.num_calls, self.num_calls + 1
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]

    @property
    def called(self) -> bool:
        return self.num_calls > 0
