"""Tokenizer: a Hugging Face `tokenizers` backend, the special tokens, and the chat templates of a model.

tokenizer.json is taken as written: its normalizer, pre-tokenizer, decoder and post-processor decide everything,
including whether BOS is added. transformers 5 instead rebuilds the pipeline for some `tokenizer_class` values
(LlamaTokenizer switches to a Metaspace pre-tokenizer that adds no "▁" after special tokens; GPT2Tokenizer drops a
Digits pre-tokenizer such as SmolLM2's), so for those classes its ids can differ from tokenizer.json's; `save()` writes
`PreTrainedTokenizerFast`, which transformers (4 and 5) loads as written, so both agree on saved folders.

Chat prompts keep the caller's text as text: a special token's text inside a message (`<|im_end|>` typed by a user)
is tokenized as ordinary characters, never as the control token the template writes (transformers does match it).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from tinylm.chat_template import plain_data, render
from tinylm.errors import TemplateError

_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
_TEMPLATE_DIR = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR: one named template per .jinja file

# The template variables a request may set when the caller passes trusted_kwargs=False (a server's
# chat_template_kwargs): the switches common templates read. Qwen3 / GLM: enable_thinking; DeepSeek-V3.1, Granite:
# thinking; gpt-oss: reasoning_effort; Llama 3.x: date_string, tools_in_user_message, builtin_tools. Anything else,
# the special tokens (bos_token, eos_token, ...) above all, stays the tokenizer's.
REQUEST_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort", "date_string",
                                     "tools_in_user_message", "builtin_tools"})
# Stands in for each character of a special token's text inside the caller's text, in a second render that shows
# where that text lands in the prompt (a private-use character: no template writes it, no tokenizer makes it special)
_FILLER = "\ue000"


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | Mapping[str, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, extra_eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        # Named templates ("default", "tool_use", ...), as tokenizer_config.json may list several
        named = chat_template if isinstance(chat_template, Mapping) else {"default": chat_template}
        self.templates = {name: source for name, source in named.items() if source is not None}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self._extra_eos_token_ids = {int(i) for i in extra_eos_token_ids}
        self._mark_special()

    def _mark_special(self) -> None:
        """Make the named tokens special in the backend, as transformers does on load.

        encode() then matches them whole, and decode(skip_special_tokens=True) drops them. Tokens the vocabulary
        lacks are not added (transformers adds them): an id past the embedding table would crash the model.
        """
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in self.special_tokens_map.values()
                   if t not in special and self.backend.token_to_id(t) is not None]
        if missing:
            self.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                             for t in dict.fromkeys(missing)])

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json, tokenizer_config.json, and the optional files beside them."""
        folder = Path(folder)
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exceptions for missing and malformed files
            raise TemplateError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        tokens = {name: _token_text(config.get(name)) for name in _TOKEN_NAMES}
        if "added_tokens_decoder" not in config:  # older folders: special_tokens_map.json wins, as in transformers
            legacy = _read_json(folder / "special_tokens_map.json")
            tokens.update({name: _token_text(legacy[name]) for name in _TOKEN_NAMES if name in legacy})
        eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids or []
        return cls(backend, chat_template=_find_templates(folder, config), extra_eos_token_ids=eos_ids, **tokens)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so that tinylm and transformers load the same tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.special_tokens_map}
        if set(self.templates) == {"default"}:
            config["chat_template"] = self.templates["default"]
        elif self.templates:
            config["chat_template"] = [{"name": n, "template": t} for n, t in self.templates.items()]
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # A chat_template.jinja left from another tokenizer would override the config's template in both loaders
        (folder / "chat_template.jinja").unlink(missing_ok=True)

    # --- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, tokenizer.json's post-processor adds BOS/EOS if it says so."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    # --- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: list[dict] | None = None, *, chat_template: str | None = None,
                            documents: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template_kwargs: Mapping[str, Any] | None = None, trusted_kwargs: bool = True,
                            **kwargs) -> str | list[int]:
        """Render `messages` as transformers does; extra kwargs reach the template (e.g. enable_thinking=False).

        `chat_template=` picks a named template (see has_template) or passes a template's source;
        `continue_final_message=True` leaves the last message open, to prefill the reply. `chat_template_kwargs` are
        more template variables (vLLM's request field), merged over kwargs. With trusted_kwargs=False (variables
        from a request) every variable must be in REQUEST_TEMPLATE_KWARGS, so a request cannot set bos_token or
        eos_token; anything else raises TemplateError naming it. Rendering has a time and size budget
        (tinylm.chat_template.render), and a role the template does not use is refused.

        With tokenize=True, the caller's text (contents, roles, names, tool calls, tools, documents, variables)
        never becomes a special token: `<|im_end|>` typed in a message stays those ten characters.
        """
        variables = {**kwargs, **(chat_template_kwargs or {})}
        if not trusted_kwargs:
            _check_request_variables(variables)
        source = self.template_source(chat_template, tools)
        if not messages:
            raise TemplateError("cannot apply a chat template to an empty conversation")
        # The special tokens are template variables; explicit ones override them (trusted callers only). They are
        # the template's own text, not the caller's, so they stay out of caller_data
        tokens = {**self.special_tokens_map, **{k: v for k, v in variables.items() if k in _TOKEN_NAMES}}
        caller_data = {"messages": messages, "tools": tools, "documents": documents,
                       "variables": {k: v for k, v in variables.items() if k not in _TOKEN_NAMES}}

        def render_with(data: dict) -> str:
            return render(source, data["messages"], tools=data["tools"], documents=data["documents"],
                          add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                          **tokens, **data["variables"])

        text = render_with(caller_data)
        if not tokenize:
            return text
        caller_data = plain_data(caller_data)
        if not self._holds_special_text(caller_data):
            # The template writes BOS itself where the model wants it, so no post-processor tokens are added
            return self.encode(text, add_special_tokens=False)
        neutral = render_with(_with_filler(caller_data, self._special_text))
        return self._encode_keeping_caller_text(text, _caller_special_text(text, neutral, caller_data,
                                                                           self._special_text))

    def has_template(self, name: str) -> bool:
        """Whether `name` is one of this tokenizer's named templates ("default", "tool_use", ...), as opposed to a
        template's source: a server can refuse sources that come from requests."""
        return isinstance(name, str) and name in self.templates

    def _holds_special_text(self, data: Any) -> bool:
        return self._special_text is not None and any(self._special_text.search(s) for s in _strings(data))

    @functools.cached_property
    def _special_text(self) -> re.Pattern | None:
        """Matches the text of any special token (longest first); None when the tokenizer has none."""
        texts = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content}
        return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None

    @functools.cached_property
    def _text_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that tokenizes special tokens' text as ordinary text. A copy, not the shared backend
        with the flag toggled, as other threads may be encoding with it (two threads may build it once each)."""
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def _encode_keeping_caller_text(self, text: str, caller_special: bytearray) -> list[int]:
        """Token ids of `text`, as encode() gives them, except that special tokens found where caller_special
        marks the caller's text are tokenized as text. The text between two of the template's own special tokens
        is re-encoded whole with special matching off, so the caller's characters tokenize as they would with
        their neighbours, and everything else keeps encode()'s ids."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pending: list[int] = []  # ids since the template's last special token
        start, rewrite = 0, False  # where that stretch of text starts; whether it holds a caller special token
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token_id not in self.special_ids or caller_special.find(1, begin, end) != -1:
                pending.append(token_id)
                rewrite = rewrite or token_id in self.special_ids
                continue
            ids += self._text_backend.encode(text[start:begin], add_special_tokens=False).ids if rewrite else pending
            ids.append(token_id)
            pending, start, rewrite = [], end, False
        ids += self._text_backend.encode(text[start:], add_special_tokens=False).ids if rewrite else pending
        return ids

    def template_source(self, name_or_source: str | None = None, tools: list | None = None) -> str:
        """transformers' `get_chat_template`: a name, else "tool_use" when tools are given, else "default"."""
        if name_or_source is not None:
            return self.templates.get(name_or_source, name_or_source)
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" not in self.templates:
            names = f" (it has named templates {sorted(self.templates)}; pass chat_template=NAME)" if self.templates \
                else ""
            raise TemplateError(f"this tokenizer has no default chat template{names}")
        return self.templates["default"]

    @property
    def chat_template(self) -> str | None:
        return self.templates.get("default")

    @chat_template.setter
    def chat_template(self, source: str) -> None:
        self.templates["default"] = source

    # --- special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as the template sees them."""
        return {name: getattr(self, name) for name in _TOKEN_NAMES if getattr(self, name) is not None}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: eos_token's, plus e.g. generation_config.json's eos list."""
        ids = set(self._extra_eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what decode(skip_special_tokens=True) drops); computed once."""
        return frozenset(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, {self.special_tokens_map}, templates={sorted(self.templates)})"


def _check_request_variables(variables: Mapping) -> None:
    refused = [name for name in variables if name not in REQUEST_TEMPLATE_KWARGS]
    if refused:
        raise TemplateError(f"the chat template variable {str(refused[0])[:60]!r} cannot be set by a request "
                            f"(allowed: {', '.join(sorted(REQUEST_TEMPLATE_KWARGS))})")


def _strings(value: Any) -> Iterator[str]:
    """Every string in plain data, dict keys included (tojson prints them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _with_filler(value: Any, special_text: re.Pattern) -> Any:
    """`value` with every special token's text in its strings replaced by as many _FILLER characters."""
    if isinstance(value, str):
        return special_text.sub(lambda m: _FILLER * len(m.group()), value)
    if isinstance(value, dict):
        return {_with_filler(k, special_text): _with_filler(v, special_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_filler(v, special_text) for v in value)
    return value


def _caller_special_text(text: str, neutral: str, caller_data: Any, special_text: re.Pattern) -> bytearray:
    """Marks (1 per character of `text`) where the caller's special-token text landed: where the render with filler
    (`neutral`) has filler. The two renders must agree everywhere else; a template whose output depends on that
    text itself (it splits on it, or tests for it) cannot be told apart from its own tokens, and is refused."""
    mask = bytearray(len(text))
    position = 0
    aligned = len(text) == len(neutral)
    for run in re.finditer(f"{_FILLER}+", neutral) if aligned else ():
        if text[position:run.start()] != neutral[position:run.start()]:
            aligned = False
            break
        mask[run.start():run.end()] = b"\x01" * (run.end() - run.start())
        position = run.end()
    if not aligned or text[position:] != neutral[position:]:
        found = next(special_text.search(s).group() for s in _strings(caller_data) if special_text.search(s))
        raise TemplateError(f"a message contains the special token text {found!r}, and this chat template treats "
                            f"that text differently from other text, so it cannot be kept as plain text")
    return mask


def _read_json(path: Path) -> dict:
    """An optional JSON object: {} when the file is absent, TemplateError when it is unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TemplateError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path} must hold a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _find_templates(folder: Path, config: dict) -> dict[str, str]:
    """Template files (chat_template.jinja, additional_chat_templates/*.jinja) win over the config's entry."""
    files = {"default": folder / "chat_template.jinja"} if (folder / "chat_template.jinja").is_file() else {}
    files.update({p.stem: p for p in sorted((folder / _TEMPLATE_DIR).glob("*.jinja"))})
    if files:
        return {name: path.read_text(encoding="utf-8") for name, path in files.items()}
    entry = config.get("chat_template")
    if isinstance(entry, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        return {t["name"]: t["template"] for t in entry}
    return {"default": entry} if entry else {}
