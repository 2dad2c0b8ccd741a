"""Build a Hugging Face `tokenizers.Tokenizer` from the tokenizer a GGUF file describes (`tokenizer.*` metadata).

A GGUF keeps the vocabulary, the merges (byte-level BPE) or scores (SentencePiece BPE), token types and special ids,
but not the normalizer, pre-tokenizer or decoder: llama.cpp derives those from `tokenizer.ggml.model` and
`tokenizer.ggml.pre` (llama-vocab.cpp: `llama_vocab::impl::load`, `llm_tokenizer_bpe`). We rebuild the pipeline the
model's original tokenizer.json had, so the ids are the original tokenizer's. transformers' GGUF converter
(integrations/gguf/gguf_tokenizer_mapping.py) differs on some files: for "smollm" it drops the Digits pre-tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tinylm.errors import WeightsError
from tinylm.tokenizer import Tokenizer

# Longest piece whose splits are ranked as merges: each piece costs len(piece)**2 in slicing, so one corrupt
# 500 000-character token would take hours. SentencePiece's pieces are at most 16 characters by default.
_MAX_MERGED_PIECE = 512
# gguf.TokenType values
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# The split regexes of the original tokenizer.json files (llama.cpp writes ASCII-only variants of the same rules).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    """How one `tokenizer.ggml.pre` value splits text before byte-level BPE."""

    split: str | None = None  # a regex applied first; None: ByteLevel's own GPT-2 regex
    digits: bool = False  # every digit is its own piece (Digits(individual_digits=True)), as SmolLM/StarCoder
    nfc: bool = False  # NFC normalizer (Qwen2's tokenizer.json has one)
    ignore_merges: bool = False  # a piece that is a whole vocab entry is not merged (llama.cpp ignore_merges)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2 = _PreTokenizer()
_SMOLLM = _PreTokenizer(digits=True)  # SmolLM2 tokenizer.json: Sequence[Digits(individual), ByteLevel(regex)]
_LLAMA3 = _PreTokenizer(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)  # Llama-3 tokenizer.json
_QWEN2 = _PreTokenizer(split=_QWEN2_SPLIT, nfc=True)  # Qwen2/2.5/3 tokenizer.json
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2,
    "smollm": _SMOLLM, "starcoder": _SMOLLM,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer | None:
    """The tinylm Tokenizer of a GGUF's metadata (with the full token arrays); None when the file has no vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind in (None, "none", "no_vocab"):
        return None
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise WeightsError("GGUF tokenizer metadata has no tokenizer.ggml.tokens list")
    backend = build_backend(meta)
    named = {name: _token(tokens, meta.get(f"tokenizer.ggml.{key}"))
             for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                               ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))}
    # End-of-turn / end-of-message ids also end generation (Llama-3 chat: <|eot_id|>, <|eom_id|>)
    extra_eos = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if isinstance(meta.get(k), int) and 0 <= meta[k] < len(tokens)]
    return Tokenizer(backend, chat_template=chat_templates(meta) or None, extra_eos_token_ids=extra_eos, **named)


def chat_templates(meta: Mapping[str, Any]) -> dict[str, str]:
    """`tokenizer.chat_template` is the default; `tokenizer.chat_template.NAME` are named ones (e.g. tool_use)."""
    templates = {"default": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {}
    prefix = "tokenizer.chat_template."
    templates.update({k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix) and isinstance(v, str)})
    return templates


def build_backend(meta: Mapping[str, Any]) -> Backend:
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise WeightsError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        backend, add_bos_default = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        backend, add_bos_default = _sentencepiece_bpe(meta, tokens, types), True
    else:
        raise WeightsError(f"GGUF tokenizer model {kind!r} is not supported (tinylm reads 'gpt2' and 'llama')")
    _add_special_tokens(backend, tokens, types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(tokens, meta.get("tokenizer.ggml.bos_token_id") if add_bos else None,
                           meta.get("tokenizer.ggml.eos_token_id") if add_eos else None)
    if post is not None:
        backend.post_processor = post
    elif kind == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no token
    return backend


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> tuple[Backend, bool]:
    """GPT-2 style BPE: tokens are spelled in the byte alphabet (space = "Ġ"), merges are "left right" strings."""
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise WeightsError(f"GGUF pre-tokenizer tokenizer.ggml.pre={pre_name!r} is not supported "
                           f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if any(len(m) != 2 for m in merges):
        raise WeightsError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend, pre.add_bos


def _byte_level_pre_tokenizer(pre: _PreTokenizer) -> pre_tokenizers.PreTokenizer:
    if pre.split is not None:  # the regex does the splitting; ByteLevel only maps bytes to its alphabet
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre.split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre.digits:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Backend:
    """SentencePiece BPE (Llama-2, TinyLlama): "▁" for spaces, <0xNN> byte-fallback tokens, merges implied by scores.

    The pipeline of TinyLlama's tokenizer.json (transformers' legacy LlamaTokenizerFast): the normalizer prepends "▁"
    to every text segment, so after a special token too, as llama.cpp's SPM tokenizer does (`is_prev_special`).
    """
    scores = list(meta.get("tokenizer.ggml.scores") or [])
    if len(scores) != len(tokens):
        raise WeightsError(f"GGUF SentencePiece tokenizer has {len(tokens)} tokens but {len(scores)} scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = _token(tokens, unk_id) or next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    backend = Backend(models.BPE(vocab, sentencepiece_merges(tokens, scores), unk_token=unk,
                                 byte_fallback=True, fuse_unk=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * add_prefix + spaces)
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []  # drop the prefix space again
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip)
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges equivalent to SentencePiece BPE, which keeps no merge list.

    llama.cpp's `llm_tokenizer_spm` repeatedly joins the adjacent pair whose union is the vocabulary piece with the
    highest score; ranking every split (left, right) of every piece by that piece's score gives BPE the same choice
    (the rule of transformers' SentencePieceExtractor). Ties keep vocabulary order.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        if len(piece) > _MAX_MERGED_PIECE:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens (never split, skipped when decoding); user-defined ones
    plain added tokens. llama.cpp matches both whole in raw text before any normalization, hence normalized=False."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _post_processor(tokens: list[str], bos_id: Any, eos_id: Any) -> processors.PostProcessor | None:
    """BOS/EOS around each sequence, as tokenizer.json's TemplateProcessing does for Llama models."""
    bos, eos = _token(tokens, bos_id), _token(tokens, eos_id)
    if bos is None and eos is None:
        return None
    head, tail = ([bos] if bos else []), ([eos] if eos else [])
    single = head + ["$A"] + tail
    pair = single + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail]
    specials = list({tokens[i]: i for i in (bos_id, eos_id) if _token(tokens, i) is not None}.items())
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _token(tokens: list[str], token_id: Any) -> str | None:
    """The text of a special token id; None when unset or out of range (some files use -1 or a stale id)."""
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return None
