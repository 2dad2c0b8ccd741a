"""GGUF reading on tiny files: exact dequantization, llama.cpp's q/k permutation, config and RoPE-scaling metadata,
conversion to a folder transformers loads, and tokenizers on tiny vocabularies against transformers' GGUF loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.weights.conftest import HEAD_DIM, HEADS, HIDDEN, K_BLOCKS, KV_HEADS, QUANTIZABLE, write_tiny
from tinylm.errors import ConfigError
from tinylm.weights.convert import convert_gguf_to_hf
from tinylm.weights.gguf import load_gguf, read_gguf_config


# --- dequantization and layout on tiny files


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, *QUANTIZABLE, *K_BLOCKS], ids=lambda q: q.name)
def test_dequantization_is_exact(tmp_path, qtype):
    # qwen3: no q/k permutation, so every tensor must equal gguf.quants.dequantize bit for bit
    decoded = write_tiny(tmp_path / "m.gguf", "qwen3", qtype)
    model = load_gguf(tmp_path / "m.gguf")
    q_proj = model.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.shape == (HEADS * HEAD_DIM, HIDDEN) and q_proj.dtype == torch.float32
    assert torch.isfinite(q_proj).all()
    assert torch.equal(q_proj, torch.from_numpy(decoded["blk.0.attn_q.weight"]))
    assert torch.equal(model.tensors["model.layers.0.mlp.down_proj.weight"],
                       torch.from_numpy(decoded["blk.0.ffn_down.weight"]))
    assert torch.equal(model.tensors["model.embed_tokens.weight"], torch.from_numpy(decoded["token_embd.weight"]))
    assert load_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16).tensors["model.norm.weight"].dtype == torch.bfloat16


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_llama_qk_permutation_is_undone(tmp_path):
    rng = np.random.default_rng(1)
    hf_q = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    hf_k = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    values = {"blk.0.attn_q.weight": llama_cpp_permute(hf_q, HEADS),
              "blk.0.attn_k.weight": llama_cpp_permute(hf_k, KV_HEADS)}
    decoded = write_tiny(tmp_path / "m.gguf", "llama", values=values)
    tensors = load_gguf(tmp_path / "m.gguf").tensors
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(hf_q))
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(hf_k))
    v_proj = tensors["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(v_proj, torch.from_numpy(decoded["blk.0.attn_v.weight"]))
    assert not torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                           torch.from_numpy(values["blk.0.attn_q.weight"]))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_converts_to_a_folder_transformers_loads(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    write_tiny(tmp_path / "m.gguf", arch, Q.Q8_0)
    config = read_gguf_config(tmp_path / "m.gguf")
    assert (config.model_type, config.qkv_bias, config.o_bias) == (arch, arch == "qwen2", False)
    assert config.qk_norm == (arch == "qwen3") and config.tie_word_embeddings and config.head_dim == HEAD_DIM
    dest = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(dest)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_rope_scaling_metadata(tmp_path):
    write_tiny(tmp_path / "lin.gguf", meta={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    assert read_gguf_config(tmp_path / "lin.gguf").rope_scaling == {"rope_type": "linear", "factor": 4.0}
    write_tiny(tmp_path / "yarn.gguf", "qwen3", meta={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    assert read_gguf_config(tmp_path / "yarn.gguf").rope_scaling == {"rope_type": "yarn", "factor": 4.0}
    # Llama 3.1: llama.cpp stores per-frequency factors (factor 32, low 1, high 4, original context 8192)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    factors = []
    for wavelen in 2 * math.pi / inv_freq:
        smooth = (8192 / wavelen - 1) / 3
        factors.append(1.0 if wavelen < 2048 else 32.0 if wavelen > 8192 else 1 / ((1 - smooth) / 32 + smooth))
    freqs = np.array(factors, np.float32)
    write_tiny(tmp_path / "l3.gguf", extra={"rope_freqs.weight": freqs.shape}, values={"rope_freqs.weight": freqs})
    assert read_gguf_config(tmp_path / "l3.gguf").rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs" not in " ".join(load_gguf(tmp_path / "l3.gguf").tensors)
    write_tiny(tmp_path / "bad.gguf", extra={"rope_freqs.weight": freqs.shape}, values={"rope_freqs.weight": freqs * 3})
    with pytest.raises(ConfigError, match="rope_freqs"):
        read_gguf_config(tmp_path / "bad.gguf")


# --- tokenizers on tiny vocabularies


def byte_level_vocab(pre: str) -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "1 2", "12 3", "Ġ Ġ", "Ċ Ċ"]
    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + [m.replace(" ", "") for m in merges]
    return {"tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
            "token_types": [3, 3] + [1] * (len(tokens) - 2), "bos_token_id": 1, "eos_token_id": 0,
            "add_bos_token": False}


@pytest.mark.parametrize("pre", ["default", "qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    """The split regexes (GPT-2: digits in runs, Qwen2: one digit, Llama-3: up to three) against transformers'."""
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "t.gguf", "qwen2", vocab=byte_level_vocab(pre))
    ours = load_gguf(tmp_path / "t.gguf").tokenizer
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["the world 12345", "isn't  in\n\nthe world", "  the<|im_start|>world", "x  12"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>the") == [1, ours.token_to_id("t"), ours.token_to_id("he")]


def sentencepiece_vocab() -> dict:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "orld",
              "world", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {"tokenizer_model": "llama", "token_list": tokens, "token_types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "token_scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}


def test_sentencepiece_tokenizer(tmp_path):
    """Llama-2 / TinyLlama style: "▁" spaces, merges from scores, byte fallback, BOS by default."""
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "t.gguf", "llama", vocab=sentencepiece_vocab())
    ours = load_gguf(tmp_path / "t.gguf").tokenizer
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    hello, world = ours.token_to_id("▁hello"), ours.token_to_id("▁world")
    assert ours.encode("hello world") == [1, hello, world]
    assert ours.encode("hello world", add_special_tokens=False) == [hello, world]
    for text in ["hello world", "world  hello", "héllo\nworld"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    # A leading space stays a "▁" of its own, as in llama.cpp and Llama-2's sentencepiece model (" hello" ->
    # [29871, 22172] there); transformers' GGUF tokenizer folds it into the prefix space.
    assert ours.encode(" hello") == [1, ours.token_to_id("▁"), hello]
    assert ours.decode(ours.encode(" hello")) == " hello"
    # After a special token llama.cpp adds the prefix space again (`is_prev_special`), as the legacy Llama-2
    # tokenizer.json does; transformers' GGUF tokenizer (Metaspace, prepend_scheme="first") does not.
    assert ours.encode("<s>hello") == [1, 1, hello]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


# --- metadata


def test_metadata_arrays_read_as_the_gguf_package_reads_them(tmp_path):
    """tinylm parses string and number arrays in one pass (gguf_reader.py, _CheckedReader): every key's value, types and
    item count equal the stock GGUFReader's, empty arrays, multi-byte UTF-8 and every scalar type included."""
    import gguf

    from tinylm.weights.gguf_reader import open_reader as _open

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("t.strings", ["", "a", "héllo ☃", "x" * 300])
    writer.add_key_value("t.floats", [0.5, -1.25, 3e38], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    writer.add_key_value("t.ints", [1, -2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    writer.add_key_value("t.u64", [2**63], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    writer.add_key_value("t.bools", [True, False], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    writer.add_string("t.after", "still aligned")  # a key after the arrays: their sizes were counted right
    writer.add_tensor("w", np.ones((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stock, ours = gguf.GGUFReader(path), _open(path)
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        mine = ours.fields[key]
        assert mine.contents() == field.contents() and mine.types == field.types, key
        assert len(mine.data) == len(field.data), key
    assert ours.fields["t.strings"].contents() == ["", "a", "héllo ☃", "x" * 300]
    assert np.array_equal(ours.tensors[0].data, stock.tensors[0].data)


def test_empty_metadata_arrays_read_as_the_gguf_package_reads_them(tmp_path):
    import struct

    import gguf

    from tinylm.weights.gguf_reader import open_reader as _open

    def key(name: str, item_type: int) -> bytes:  # an empty array: value type 9, item type, length 0
        return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IIQ", 9, item_type, 0)

    path = tmp_path / "empty.gguf"  # GGUF v3 with no tensors and two keys (GGUFWriter refuses empty arrays)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + key("t.strings", 8) + key("t.floats", 6))
    stock, ours = gguf.GGUFReader(path), _open(path)
    for name in ("t.strings", "t.floats"):
        assert ours.fields[name].types == stock.fields[name].types == [gguf.GGUFValueType.ARRAY]
        assert ours.fields[name].contents() == stock.fields[name].contents() == []
