"""Structured outputs and tool calls through the OpenAI and TGI routes, with the official `openai` client against the
default model (SmolLM2-135M-Instruct) served in float32, sampled at temperature 0.7: whatever the small model would
rather write, every reply parses and validates against its schema."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import post

SCHEMAS = {
    "nested objects": {
        "type": "object", "additionalProperties": False, "required": ["person", "address"],
        "properties": {
            "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                       "properties": {"name": {"type": "string", "maxLength": 24},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
            "address": {"type": "object", "additionalProperties": False, "required": ["city"],
                        "properties": {"city": {"type": "string", "maxLength": 24}}}}},
    "arrays with min and max items": {
        "type": "object", "additionalProperties": False, "required": ["tags"],
        "properties": {"tags": {"type": "array", "minItems": 2, "maxItems": 4,
                                "items": {"type": "string", "maxLength": 12}}}},
    "enums and integer ranges": {
        "type": "object", "additionalProperties": False, "required": ["color", "count"],
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "count": {"type": "integer", "minimum": 3, "maximum": 7}}},
    "patterns": {
        "type": "object", "additionalProperties": False, "required": ["zip", "phone"],
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "phone": {"type": "string", "pattern": "^\\+33 [0-9]{9}$"}}},
    "nullable fields": {
        "type": "object", "additionalProperties": False, "required": ["nickname", "score"],
        "properties": {"nickname": {"type": ["string", "null"], "maxLength": 16},
                       "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}}},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 32},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 32}}}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kwargs):
    kwargs = {"model": "smollm2", "messages": ASK, "temperature": 0.7, "max_tokens": 160, **kwargs}
    return client.chat.completions.create(**kwargs)


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_replies_validate(client, name):
    schema = SCHEMAS[name]
    out = chat(client, n=3, seed=11, messages=[{"role": "user", "content": f"Make up an example of {name} as JSON."}],
               response_format={"type": "json_schema", "json_schema": {"name": "example", "schema": schema,
                                                                       "strict": True}})
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_reply_is_an_object(client):
    out = chat(client, response_format={"type": "json_object"}, max_tokens=200, seed=3,
               messages=[{"role": "user", "content": "Describe a cat as a JSON object."}])
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert out.choices[0].message.content.startswith("{")


def test_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=50_000_000)
        capital: bool

    out = client.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Tell me about Paris."}], response_format=City,
        temperature=0.7, max_tokens=120, seed=5)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, City) and 0 <= parsed.population <= 50_000_000


def test_regex_and_choice_hold(client):
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    out = client.completions.create(model="smollm2", prompt="Call me at", max_tokens=30, temperature=0.9, n=3,
                                    seed=1, extra_body={"guided_regex": phone})
    for choice in out.choices:
        assert re.fullmatch(phone, choice.text), choice.text
    out = chat(client, n=4, seed=2, max_tokens=10, extra_body={"structured_outputs": {"choice": ["sunny", "rainy",
                                                                                               "cloudy"]}})
    assert all(c.message.content in {"sunny", "rainy", "cloudy"} for c in out.choices)


def test_grammar_constraint(client):
    lark = 'start: "The answer is " ANSWER "."\nANSWER: /(yes|no)/'
    out = chat(client, max_tokens=20, extra_body={"structured_outputs": {"grammar": lark}})
    assert out.choices[0].message.content in {"The answer is yes.", "The answer is no."}
    gbnf = 'root ::= "x=" [0-9] [0-9]'
    out = chat(client, max_tokens=20, extra_body={"guided_grammar": gbnf})
    text = out.choices[0].message.content
    assert len(text) == 4 and text.startswith("x=") and text[2:].isdigit()


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_has_valid_arguments(client, tool_choice):
    out = chat(client, tools=[WEATHER, TIME], tool_choice=tool_choice, n=2, seed=7)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            function = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
            jsonschema.validate(json.loads(call.function.arguments), function["parameters"])
            assert call.id.startswith("call_") and call.type == "function"
        if tool_choice != "required":
            assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]


def test_streamed_tool_call_equals_the_whole_one(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(client, tools=[WEATHER], tool_choice=named, temperature=0).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chat(client, tools=[WEATHER], tool_choice=named, temperature=0, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and len(calls) == len(whole) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole[0].function.name, whole[0].function.arguments)
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_tool_round_trip(client):
    """Call, the tool's result, the final answer: the history with tool_calls and a tool message renders and runs."""
    first = chat(client, tools=[WEATHER], tool_choice="required", temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    final = chat(client, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_refusals_name_the_problem(client):
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    cases = [
        ({"response_format": bad_schema}, "objectx"),
        ({"extra_body": {"guided_regex": "[a-"}}, "regex"),
        ({"tools": [WEATHER]}, "tool_choice"),  # "auto" on a template without a tool format
        ({"tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}}, "one way"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(openai.BadRequestError) as error:
            chat(client, max_tokens=4, **kwargs)
        assert expected in error.value.message, (kwargs, error.value.message)


def test_constrained_and_plain_requests_share_a_batch(client):
    """Unconstrained greedy replies are token for token what they are alone while constrained ones run beside them."""
    prompts = [f"Tell me one fact about the number {i}." for i in range(4)]
    alone = [chat(client, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24)
             .choices[0].message.content for p in prompts]
    schema = SCHEMAS["enums and integer ranges"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(chat, client, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24)
                 for p in prompts]
        constrained = [pool.submit(chat, client, seed=i, response_format={
            "type": "json_schema", "json_schema": {"name": "e", "schema": schema}}) for i in range(4)]
        together = [f.result().choices[0].message.content for f in plain]
        for future in constrained:
            jsonschema.validate(json.loads(future.result().choices[0].message.content), schema)
    assert together == alone


def test_tgi_grammar(server):
    url, _ = server
    schema = SCHEMAS["enums and integer ranges"]
    body = {"inputs": "A color and a count as JSON:", "parameters": {
        "max_new_tokens": 60, "do_sample": True, "temperature": 0.7, "seed": 4,
        "grammar": {"type": "json", "value": schema}}}
    reply = post(url, "/generate", body)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["generated_text"]), schema)
    body["parameters"]["grammar"] = {"type": "regex", "value": "[0-9]{3}"}
    text = post(url, "/generate", body).json()["generated_text"]
    assert len(text) == 3 and text.isdigit()
    body["parameters"]["grammar"] = {"type": "regex", "value": "(["}
    reply = post(url, "/generate", body)
    assert reply.status_code == 422 and "regex" in reply.json()["error"]


THINKING_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>: "
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{%- else %}<think>\n{%- endif %}"
    "{%- endif %}")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """A tiny Qwen3 whose template opens a <think> block after the generation prompt and takes tools."""
    import tinylm
    from tests.server.conftest import running_server
    from tinylm.server.app import ServerConfig
    from tinylm.tiny import make_tiny
    llm = tinylm.load(make_tiny("qwen3", tmp_path_factory.mktemp("thinking") / "qwen3", seed=6))
    llm.tokenizer.chat_template = THINKING_TEMPLATE
    with running_server(llm, ServerConfig(model_name="tiny")) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_reasoning_content_is_split_off(thinking_server):
    """The prompt opens the block and the random model never closes it: all of its reply is reasoning; with
    enable_thinking=false the template closes the block and all of it is the answer."""
    ask = {"model": "tiny", "messages": ASK, "max_tokens": 12, "temperature": 0}
    thinking = thinking_server.chat.completions.create(**ask).choices[0].message
    answering = thinking_server.chat.completions.create(
        **ask, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert thinking.reasoning_content and not thinking.content
    assert answering.content and getattr(answering, "reasoning_content", None) is None
    streamed = "".join(getattr(chunk.choices[0].delta, "reasoning_content", None) or "" for chunk in
                       thinking_server.chat.completions.create(**ask, stream=True) if chunk.choices)
    assert streamed.strip() == thinking.reasoning_content


def test_auto_tool_choice_on_a_template_with_a_call_format(thinking_server):
    out = thinking_server.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=8,
                                                  temperature=0)
    assert out.choices[0].finish_reason in {"length", "stop", "tool_calls"}
