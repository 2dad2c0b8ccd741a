"""A tinylm Tokenizer -> the `tokenizer.*` metadata of a GGUF file (the inverse of tinylm/weights/gguf_tokenizer.py).

llama.cpp keeps the vocabulary, merges or scores, token types, special ids and chat templates, but not the
tokenizer's pipeline: it rebuilds that from `tokenizer.ggml.model` ("gpt2": byte-level BPE as Qwen2 and SmolLM2;
"llama": SentencePiece-style BPE with byte fallback as Llama 2 and TinyLlama) and `tokenizer.ggml.pre` (the
pre-tokenizer's name). The pre-tokenizer is chosen by trial: the first llama.cpp name whose rebuilt tokenizer
gives the same ids as the original on a probe text, so a file is never written with a tokenizer that splits text
differently from the model's own.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gguf import GGUFWriter, TokenType

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.weights.gguf_tokenizer import build_backend

# llama.cpp pre-tokenizer names tried in order (tinylm/weights/gguf_tokenizer.py rebuilds each of them)
_PRE_CANDIDATES = ("gpt-2", "smollm", "qwen2", "llama-bpe")
_PROBE = ("Hello world! It's 2025: 12345 apples, naïve café, 東京 and 😀.\n\n  def f(x):\n\treturn x**2  \n"
          "I'll say \"don't\" -- OK?   Trailing   spaces \r\n 3.14159 1,000,000")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_tokenizer(writer: GGUFWriter, tokenizer: Any, config: ModelConfig) -> None:
    """Write the vocabulary, merges or scores, special ids and chat templates of `tokenizer` (tinylm Tokenizer)."""
    meta = tokenizer_metadata(tokenizer, config)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in meta:
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in meta:
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.add_space_prefix" in meta:
        writer.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("unknown", writer.add_unk_token_id),
                     ("padding", writer.add_pad_token_id)):
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None:
            add(meta[f"tokenizer.ggml.{key}_token_id"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    templates = tokenizer.templates
    if set(templates) == {"default"}:
        writer.add_chat_template(templates["default"])
    elif templates:  # named ones as tokenizer.chat_template.NAME, the default as tokenizer.chat_template
        writer.add_chat_template([{"name": name, "template": source} for name, source in templates.items()])


def tokenizer_metadata(tokenizer: Any, config: ModelConfig) -> dict[str, Any]:
    """The `tokenizer.*` keys as GGUFReader returns them (plain Python values)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece-style); this one is "
                          f"{model.get('type')!r}")
    tokens, types = _tokens(tokenizer, config.vocab_size, byte_fallback=bool(model.get("byte_fallback")))
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if model.get("byte_fallback"):
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": _scores(tokens, model),
                     "tokenizer.ggml.add_space_prefix": _adds_space_prefix(spec)})
    else:
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": _merges(model)})
    meta.update(_special_ids(tokenizer, config))
    if meta["tokenizer.ggml.model"] == "gpt2":
        meta["tokenizer.ggml.pre"] = _pre_tokenizer(tokenizer, meta)
    return meta


def _tokens(tokenizer: Any, rows: int, byte_fallback: bool) -> tuple[list[str], list[int]]:
    """Tokens in id order, padded to the embedding's rows with unused `[PAD{i}]` entries (llama.cpp sizes its
    vocabulary by this list and the embedding must match it)."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
    if len(vocab) > rows:
        raise ConfigError(f"the tokenizer has {len(vocab)} tokens but the embedding only {rows} rows")
    by_id = {i: token for token, i in vocab.items()}
    added = {i: t for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(_token_type(i, token, added, unk, byte_fallback))
    return tokens, types


def _token_type(i: int, token: str | None, added: dict, unk: int | None, byte_fallback: bool) -> int:
    if token is None:
        return TokenType.UNUSED
    if i == unk:
        return TokenType.UNKNOWN
    if i in added:
        return TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
    if byte_fallback and _BYTE_TOKEN.fullmatch(token):
        return TokenType.BYTE
    return TokenType.NORMAL


def _merges(model: dict) -> list[str]:
    """tokenizer.json merges ("a b" strings, or [a, b] pairs since tokenizers 0.20) as GGUF's "a b" strings."""
    merges = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise ConfigError(f"merge {left!r} + {right!r} holds a space, which GGUF's 'left right' merges cannot "
                              "express")
        merges.append(f"{left} {right}")
    return merges


def _scores(tokens: list[str], model: dict) -> list[float]:
    """SentencePiece-style scores from BPE merge ranks: llama.cpp joins the adjacent pair whose union has the
    highest score, so the piece made by merge r scores -(r + 1); pieces no merge makes score 0."""
    rank = {}
    for r, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-(rank[t] + 1.0) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer, or Metaspace with a prepend scheme)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or re.search(r'"prepend_scheme": "(first|always)"', text) is not None


def _special_ids(tokenizer: Any, config: ModelConfig) -> dict[str, Any]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else next(iter(config.eos_token_id), None)
    others = [i for i in config.eos_token_id if i != eos]  # a second end id (Llama-3's <|eot_id|>) as end-of-turn
    probe = tokenizer.encode("a")
    bos = tokenizer.bos_token_id
    return {
        "tokenizer.ggml.bos_token_id": bos if bos is not None else config.bos_token_id,
        "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.eot_token_id": others[0] if others else None,
        "tokenizer.ggml.unknown_token_id": tokenizer.unk_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else config.pad_token_id,
        # whether encoding adds them: tokenizer.json's post-processor decides, and llama.cpp must do the same
        "tokenizer.ggml.add_bos_token": bos is not None and bool(probe) and probe[0] == bos,
        "tokenizer.ggml.add_eos_token": eos is not None and bool(probe) and probe[-1] == eos,
    }


def _pre_tokenizer(tokenizer: Any, meta: dict[str, Any]) -> str:
    """The first llama.cpp pre-tokenizer name under which the GGUF tokenizer gives the original's ids."""
    expected = tokenizer.backend.encode(_PROBE, add_special_tokens=False).ids
    for name in _PRE_CANDIDATES:
        rebuilt = build_backend({**meta, "tokenizer.ggml.pre": name})
        if rebuilt.encode(_PROBE, add_special_tokens=False).ids == expected:
            return name
    raise ConfigError("the tokenizer splits text in a way none of llama.cpp's pre-tokenizers tinylm knows "
                      f"({', '.join(_PRE_CANDIDATES)}) reproduces, so llama.cpp would tokenize differently")
