"""Small tokenizers trained here (no downloads) for the tests/test_tokenizer_*.py files, and the texts and chats
they run. Two pipelines cover the small LMs tinylm runs: byte-level BPE (GPT-2, Qwen2, SmolLM2, Llama-3) and
SentencePiece-style BPE with "▁" spaces and byte fallback (Llama-2, TinyLlama). The chat templates are the models'
real ones. The fixtures that build them (trained, folders, pairs) are in tests/conftest.py.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

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
