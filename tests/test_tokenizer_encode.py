"""tinylm.tokenizer encode and decode against transformers' AutoTokenizer, on the small byte-level and
SentencePiece-style tokenizers of tests/tokenizer_helpers.py; special tokens, EOS ids and sizes too."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend

from tests.tokenizer_helpers import FAMILIES, TEXTS, _backend, _write_folder
from tinylm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


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
