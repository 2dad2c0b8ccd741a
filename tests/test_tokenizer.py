"""tinylm.tokenizer against transformers' AutoTokenizer, on small tokenizers trained here (no downloads).

Two pipelines cover the small LMs tinylm runs: byte-level BPE (GPT-2, Qwen2, SmolLM2, Llama-3) and SentencePiece-style
BPE with "▁" spaces and byte fallback (Llama-2, TinyLlama). The chat templates are the models' real ones.
"""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from tinylm import chat_template
from tinylm.errors import TemplateError
from tinylm.tokenizer import IncrementalDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Small language models run well on a laptop.",
    "Hello world! How are you today? I am fine, thank you. The weather in Paris is sunny, 23 degrees.",
    "Tokenizers split text into pieces: words, sub-words and bytes. Numbers like 12345 and 2024 are common.",
    "Café, naïve, résumé, jalapeño: accents appear in English text too. Über straße.",
    "Python code: def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "system user assistant tool function arguments name weather city",
] * 4
# Text the tests encode: special tokens inline, spaces at the edges, newlines, accents, CJK and emoji that the small
# vocabularies do not know (so they become several byte tokens), digits.
TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "The weather in Paris is sunny.\nNew line,\n\ttab and  two spaces.",
    "Café naïve résumé jalapeño Über",
    "日本語のテキストと中文字符",
    "Emoji: 🦙🚀 and 👩‍💻 in text 🎉",
    "Numbers 12345 and 3.14159",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>Hello</s> world</s>",
    "",
]

QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

LLAMA32_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

SMOLLM2_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501
ZEPHYR_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"  # noqa: E501

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
# Every folder names PreTrainedTokenizerFast: transformers 5 then uses tokenizer.json as written, as tinylm does
# (its LlamaTokenizer / GPT2Tokenizer classes rebuild parts of the pipeline; see tinylm/tokenizer.py).
FAMILIES = {
    "qwen2": dict(post="byte_level", config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                            "unk_token": None, "bos_token": None, "chat_template": QWEN25_TEMPLATE}),
    "smollm2": dict(post="byte_level", config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                              "chat_template": SMOLLM2_TEMPLATE}),
    "llama3": dict(post="bos", config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                       "chat_template": LLAMA32_TEMPLATE}),
    "tinyllama": dict(post="bos", config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                          "pad_token": "</s>", "chat_template": ZEPHYR_TEMPLATE}),
}

SYSTEM_CHAT = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français si besoin."},
    {"role": "user", "content": "Hello! What is 2 + 2?"},
    {"role": "assistant", "content": "4. 😀"},
    {"role": "user", "content": "And in 日本語?"},
]
USER_CHAT = [{"role": "user", "content": "  Tell me a joke about llamas 🦙  "}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QWEN_TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [  # None as OpenAI clients send it: transformers drops it
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "18 °C"},
    {"role": "tool", "content": "12 °C"},
    {"role": "assistant", "content": "Paris 18 °C, Zürich 12 °C."},
]
LLAMA_TOOL_CHAT = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": {"temperature": 18, "unit": "°C"}},
]
# (family, messages, tools, extra template variables)
CHAT_CASES = [
    ("qwen2", SYSTEM_CHAT, None, {}),
    ("qwen2", USER_CHAT, None, {}),  # the template's default system prompt
    ("qwen2", QWEN_TOOL_CHAT, TOOLS, {}),
    ("smollm2", SYSTEM_CHAT, None, {}),
    ("smollm2", USER_CHAT, None, {}),
    ("llama3", SYSTEM_CHAT, None, {"date_string": "26 Jul 2024"}),
    ("llama3", LLAMA_TOOL_CHAT, TOOLS, {"date_string": "26 Jul 2024"}),
    ("llama3", LLAMA_TOOL_CHAT, TOOLS, {"date_string": "1 Jan 2025", "tools_in_user_message": False}),
    ("tinyllama", SYSTEM_CHAT, None, {}),
    ("tinyllama", USER_CHAT, None, {}),
]


# --- building the tokenizers

def _byte_level_backend() -> Backend:
    """Qwen2's pipeline: NFC, its split regex, byte-level BPE; the special tokens of ChatML and Llama-3."""
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=BYTE_LEVEL_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    return tok


def _sentencepiece_backend() -> Backend:
    """Llama-2's tokenizer.json: "▁" spaces by normalizer, BPE with <0xNN> byte fallback, a decoder that strips the
    first space. Trained with a Metaspace pre-tokenizer, as SentencePiece keeps "▁" at word starts."""
    trainer_tok = Backend(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>", "</s>"],
                                                                limit_alphabet=50))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    return tok


def _backend(family: str, trained: dict[str, str]) -> Backend:
    kind = "sentencepiece" if family == "tinyllama" else "byte_level"
    tok = Backend.from_str(trained[kind])
    bos = FAMILIES[family]["config"]["bos_token"]
    if FAMILIES[family]["post"] == "bos":  # Llama's post-processor adds BOS; Qwen's and SmolLM2's add nothing
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _write_folder(folder, backend: Backend, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(full))
    return folder


@pytest.fixture(scope="module")
def trained() -> dict[str, str]:
    return {"byte_level": _byte_level_backend().to_str(), "sentencepiece": _sentencepiece_backend().to_str()}


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: _write_folder(root / f, _backend(f, trained), spec["config"]) for f, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def pairs(folders) -> dict:
    """family -> (tinylm Tokenizer, transformers tokenizer), both loaded from the same folder."""
    return {f: (Tokenizer.from_folder(d), transformers.AutoTokenizer.from_pretrained(str(d)))
            for f, d in folders.items()}


# --- encode / decode

@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_transformers(pairs, family):
    ours, theirs = pairs[family]
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_comes_only_from_the_post_processor(pairs, family):
    ours, _ = pairs[family]
    ids = ours.encode("Hello world")
    adds_bos = FAMILIES[family]["post"] == "bos"
    assert (ids[0] == ours.bos_token_id) is adds_bos
    assert ours.encode("Hello world", add_special_tokens=False) == (ids[1:] if adds_bos else ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_matches_transformers(pairs, family):
    ours, theirs = pairs[family]
    for text in TEXTS:
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        # a character cut in the middle of its bytes decodes to U+FFFD in both
        assert ours.decode(ids[:-1]) == theirs.decode(ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_and_sizes_match_transformers(pairs, family):
    ours, theirs = pairs[family]
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.vocab_size == len(theirs)
    assert ours.eos_token_ids == {theirs.eos_token_id}
    assert ours.id_to_token(ours.eos_token_id) == ours.eos_token
    assert ours.token_to_id("no such token") is None


def test_generation_config_adds_eos_ids(tmp_path, trained):
    folder = _write_folder(tmp_path, _backend("llama3", trained), FAMILIES["llama3"]["config"])
    plain = Tokenizer.from_folder(folder)
    extra = [plain.token_to_id("<|endoftext|>"), plain.token_to_id("<|im_end|>")]
    assert plain.eos_token_ids == {plain.token_to_id("<|eot_id|>")}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": extra}))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids == {tok.eos_token_id, *extra}
    assert tok.eos_token_id == plain.eos_token_id


def test_special_tokens_map_json_is_read_like_transformers(tmp_path, trained):
    """Folders without added_tokens_decoder take their special tokens from special_tokens_map.json."""
    folder = _write_folder(tmp_path, _backend("qwen2", trained), {"eos_token": "<|endoftext|>"})
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>", "lstrip": False}, "pad_token": "<|endoftext|>"}))
    ours, theirs = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (ours.eos_token, ours.pad_token) == (theirs.eos_token, theirs.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_named_tokens_become_special(tmp_path, trained):
    """A named token the vocabulary holds as plain text is made special, as transformers does: skipped by decode."""
    backend = Backend.from_str(trained["byte_level"])
    backend.add_tokens(["<|custom_end|>"])
    folder = _write_folder(tmp_path, backend, {"eos_token": "<|custom_end|>"})
    ours, theirs = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = ours.encode("Hi<|custom_end|>")
    assert ids == theirs.encode("Hi<|custom_end|>")
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "Hi"


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


# --- folders

def test_missing_or_broken_tokenizer_json_raises_template_error(tmp_path):
    with pytest.raises(TemplateError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TemplateError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_in_transformers(pairs, family, tmp_path):
    ours, _ = pairs[family]
    ours.save(tmp_path)
    theirs, again = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_folder(tmp_path)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text) == again.encode(text), text
    for messages, tools, variables in [(m, t, v) for f, m, t, v in CHAT_CASES if f == family]:
        args = dict(add_generation_prompt=True, tools=tools, **variables)
        text = ours.apply_chat_template(messages, **args)
        assert theirs.apply_chat_template(messages, tokenize=False, **args) == text
        assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **args) == \
            again.apply_chat_template(messages, tokenize=True, **args)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)


def test_save_writes_named_templates(tmp_path, trained):
    tok = Tokenizer(Backend.from_str(trained["byte_level"]), eos_token="<|im_end|>",
                    chat_template={"default": SMOLLM2_TEMPLATE, "tool_use": QWEN25_TEMPLATE})
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.chat_template == {"default": SMOLLM2_TEMPLATE, "tool_use": QWEN25_TEMPLATE}
    assert Tokenizer.from_folder(tmp_path).templates == tok.templates


# --- streaming

def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    decoder = IncrementalDecoder(tok, **kw)
    chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert decoder.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_full_decode(pairs, family):
    ours, _ = pairs[family]
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (True, False):
            chunks = _stream(ours, ids, skip_special_tokens=skip)
            assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


@pytest.mark.parametrize("family", ["qwen2", "tinyllama"])
def test_streaming_holds_back_split_characters(pairs, family):
    """An emoji the vocabulary lacks is 4 byte tokens: nothing comes out until its last byte arrives."""
    ours, _ = pairs[family]
    ids = ours.encode("🦙", add_special_tokens=False)
    byte_ids = ids[-4:]
    assert all("\ufffd" in ours.decode([i]) for i in byte_ids)  # really one character split over 4 tokens
    decoder = IncrementalDecoder(ours)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]).endswith("🦙")


def test_flush_releases_an_unfinished_character(pairs):
    ours, _ = pairs["tinyllama"]
    ids = ours.encode("ok 🦙", add_special_tokens=False)[:-1]  # the emoji's last byte never comes
    chunks = _stream(ours, ids)
    assert chunks[-1].endswith("\ufffd") and "".join(chunks) == ours.decode(ids)


@pytest.mark.parametrize("family", ["qwen2", "tinyllama"])
def test_streaming_after_a_prompt(pairs, family):
    """With prompt_ids, the first tokens come out as they read after the prompt (a "▁" space stays a space)."""
    ours, _ = pairs[family]
    answer = ours.encode(" Sure, here is one 🦙.", add_special_tokens=False)
    # a chat prompt, and a prompt whose last tokens are all special (skipped, so they give no context)
    for prompt in [ours.apply_chat_template(USER_CHAT, tokenize=True), ours.encode("Hi") + [ours.eos_token_id] * 6]:
        text = "".join(_stream(ours, answer, prompt_ids=prompt))
        assert text == ours.decode(prompt + answer)[len(ours.decode(prompt)):]


class _CountingBackend:
    """Wraps a backend to record the longest id list the decoder asks to decode."""

    def __init__(self, backend):
        self.backend, self.longest = backend, 0

    def decode(self, ids, skip_special_tokens):
        self.longest = max(self.longest, len(ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_added_tokens_decoder(self):
        return self.backend.get_added_tokens_decoder()


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("family", ["qwen2", "tinyllama"])
def test_streaming_work_per_token_is_constant(pairs, family, skip):
    """The decoded window stays a few tokens long, over long text and over a long run of special tokens."""
    ours, _ = pairs[family]
    ids = ours.encode(" ".join(TEXTS) * 20) + [ours.eos_token_id] * 500 + ours.encode(" tail", add_special_tokens=False)
    counting = _CountingBackend(ours.backend)
    chunks = _stream(SimpleNamespace(backend=counting, special_ids=ours.special_ids), ids, skip_special_tokens=skip)
    assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
    assert len(ids) > 1500 and counting.longest <= 8
