"""tinylm.detokenize.IncrementalDecoder: streamed text equals a full decode, characters split over byte tokens are
held back until complete, and the work per token stays constant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.tokenizer_helpers import FAMILIES, TEXTS, USER_CHAT
from tinylm.detokenize import IncrementalDecoder
from tinylm.tokenizer import Tokenizer

pytest.importorskip("transformers")  # the pairs fixture compares against transformers


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
