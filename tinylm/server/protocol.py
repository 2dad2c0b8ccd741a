"""Request bodies of the OpenAI and TGI routes (pydantic), and their translation to SamplingParams.

Pydantic checks types and refuses what tinylm does not implement: an unknown field is a 400 naming it (never
silently dropped), and so are Infinity / NaN. The meaning of each value (ranges, limits) is checked once, by
SamplingParams, so the Python API, the CLI and both HTTP dialects refuse the same inputs with the same messages.
Fields the client leaves out take the model's recommended sampling (generation_config.json, a built-in model's
card), as vLLM does, else the OpenAI defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tinylm.sampling_params import (MAX_CHOICES, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_SEED, MAX_STOP_STRINGS,
                                    MIN_SEED, SamplingParams, StructuredOutputsParams)

MAX_MESSAGES = 4096  # chat messages per request, the most --max-messages may allow
MAX_TOOLS = 128  # OpenAI's limit on tools per request
FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"  # OpenAI's rule for function and schema names


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def documented(default=None, **constraints):
    """A field whose range SamplingParams (or the route) checks, with one message for every entry point, stated in
    the OpenAPI document as JSON Schema keywords. `x-token-id` becomes [0, vocab) when the document is built."""
    return Field(default, json_schema_extra=constraints)


TOKEN_ID = {"minimum": 0, "x-token-id": True}
TOKEN_IDS = {"items": TOKEN_ID}


class StreamOptions(StrictRequest):
    include_usage: bool = False


class JSONSchemaFormat(StrictRequest):
    """response_format's json_schema: {name, schema, strict, description}."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str = documented(..., pattern=FUNCTION_NAME)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(StrictRequest):
    """vLLM's `structured_outputs` request field (StructuredOutputsParams' fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = documented(maxItems=MAX_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class _Constrained(StrictRequest):
    """The ways to constrain output both OpenAI routes take: OpenAI's response_format, vLLM's structured_outputs
    and its older guided_* fields. At most one may be given."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = documented(maxItems=MAX_CHOICES)
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None

    def constraint(self) -> StructuredOutputsParams | None:
        """The request's output constraint (ValueError when it gives several, or a json_schema without schema)."""
        given = [name for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                   "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give one way to constrain the output, got {', '.join(given)}")
        if not given:
            return None
        return _constraint_of(self, given[0])


def _constraint_of(request: _Constrained, field: str) -> StructuredOutputsParams:
    whitespace = request.guided_whitespace_pattern
    if field == "response_format":
        fmt = request.response_format
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return StructuredOutputsParams(json=fmt.json_schema.json_schema)
    if field == "structured_outputs":
        return StructuredOutputsParams(**request.structured_outputs.model_dump(by_alias=True, exclude_none=True))
    kind = field.removeprefix("guided_")
    return StructuredOutputsParams(**{kind: getattr(request, field)}, whitespace_pattern=whitespace)


class _OpenAISampling(_Constrained):
    """The sampling fields both OpenAI routes share, plus vLLM's extensions."""

    model: str | None = None
    n: int = documented(1, minimum=1, maximum=MAX_N)
    temperature: float | None = documented(minimum=0)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    top_k: int | None = documented(minimum=-1)
    min_p: float | None = documented(minimum=0, maximum=1)
    stop: str | list[str] | None = documented(minLength=1, maxItems=MAX_STOP_STRINGS, items={"minLength": 1})
    stop_token_ids: list[int] | None = documented(**TOKEN_IDS)
    seed: int | None = documented(minimum=MIN_SEED, maximum=MAX_SEED)
    presence_penalty: float | None = documented(minimum=-2, maximum=2)
    frequency_penalty: float | None = documented(minimum=-2, maximum=2)
    repetition_penalty: float | None = documented(exclusiveMinimum=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = documented(propertyNames={"pattern": "^[0-9]+$"}, additionalProperties={
        "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS})
    min_tokens: int = documented(0, minimum=0)
    user: str | None = None  # the end user's id (OpenAI's abuse-monitoring field): accepted, not used

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict | None = None) -> SamplingParams:
        """`defaults`: the model's recommended sampling for fields the request leaves out."""
        chosen = {**OPENAI_DEFAULTS, **(defaults or {})}
        given = {name: getattr(self, name) for name in OPENAI_DEFAULTS if getattr(self, name) is not None}
        chosen.update(given)
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], seed=self.seed, logprobs=logprobs,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=_token_bias(self.logit_bias),
            structured_outputs=self.constraint(), **chosen)


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]] = documented(..., minLength=1, minItems=1, items={
        "minLength": 1, "minItems": 1, **TOKEN_ID, "items": TOKEN_ID})
    max_tokens: int | None = documented(16, minimum=0)
    logprobs: int | None = documented(minimum=0, maximum=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = documented(minimum=1, maximum=MAX_N)
    suffix: str | None = documented(maxLength=0)

    def to_params(self, defaults: dict | None = None) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        max_tokens = _default(self.max_tokens, 16)
        if max_tokens == 0:
            max_tokens = 1  # scoring only (with echo: the prompt's logprobs): one token is generated and dropped
        return self.sampling_params(max_tokens, self.logprobs, defaults)


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    role: str = documented(..., pattern=r"^[a-z_]+$")  # the template's roles: tokenizer.template_roles
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Earlier turns of a conversation as the client recorded them; the chat template renders them
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as a chat template sees it (text parts of multi-part content joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        for name in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        return message

    def text_bytes(self) -> int:
        """UTF-8 bytes of the message's text, counted before anything renders or tokenizes it."""
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or ())
        return len(content.encode()) + len((self.reasoning_content or "").encode())


class FunctionDefinition(StrictRequest):
    name: str = documented(..., pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # arguments are held to the schema whenever a call is forced, strict or not


class Tool(StrictRequest):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictRequest):
    name: str


class NamedToolChoice(StrictRequest):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_OpenAISampling):
    # Bounded here too: pydantic stops at the bound instead of validating 100k messages on the event loop
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = documented(minimum=1)
    max_completion_tokens: int | None = documented(minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = documented(minimum=0, maximum=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # a template name of the model, or (if the server trusts requests) a source
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = documented(maxItems=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def to_params(self, default_max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        max_tokens = _default(self.max_completion_tokens, _default(self.max_tokens, default_max_tokens))
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, defaults)


class TGIGrammar(StrictRequest):
    """TGI's grammar parameter: {"type": "json", "value": a JSON schema} or {"type": "regex", "value": a regex}
    ("json_schema": {"name", "schema"} as its value, as TGI 3 also takes)."""

    type: Literal["json", "regex", "json_schema"]
    value: dict[str, Any] | str

    def constraint(self) -> StructuredOutputsParams:
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise ValueError("a regex grammar's value must be a string")
            return StructuredOutputsParams(regex=self.value)
        schema = self.value
        if self.type == "json_schema":
            schema = self.value.get("schema") if isinstance(self.value, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("a json_schema grammar's value must be {\"name\", \"schema\"}")
        return StructuredOutputsParams(json=schema)


class TGIParameters(StrictRequest):
    """TGI's parameters, with the ranges its router's validation enforces (tgi_routes.to_sampling_params)."""

    best_of: int | None = documented(minimum=1, maximum=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = documented(minimum=-2, maximum=2)
    max_new_tokens: int | None = documented(minimum=1)
    repetition_penalty: float | None = documented(exclusiveMinimum=0)
    return_full_text: bool | None = False
    seed: int | None = documented(minimum=MIN_SEED, maximum=MAX_SEED)
    stop: list[str] = Field(default_factory=list, json_schema_extra={"maxItems": 4, "items": {"minLength": 1}})
    temperature: float | None = documented(exclusiveMinimum=0)
    top_k: int | None = documented(minimum=1)
    top_n_tokens: int | None = documented(minimum=0, maximum=5)
    top_p: float | None = documented(exclusiveMinimum=0, exclusiveMaximum=1)
    truncate: int | None = documented(minimum=1)
    typical_p: float | None = documented(enum=[1.0, None])
    watermark: bool = documented(False, enum=[False])
    grammar: TGIGrammar | None = None
    adapter_id: str | None = None  # a LoRA adapter the server serves (--lora-modules), by name


class TGIRequest(StrictRequest):
    inputs: str = documented(..., minLength=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# vLLM's values for fields neither the request nor the model's recommendation sets
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _default(value, default):
    return default if value is None else value


def _token_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends logit_bias keyed by token id strings."""
    if not logit_bias:
        return None
    bias = {}
    for key, value in logit_bias.items():
        if not key.strip().lstrip("-").isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        bias[int(key)] = value
    return bias


ErrorDialect = Literal["openai", "tgi"]
