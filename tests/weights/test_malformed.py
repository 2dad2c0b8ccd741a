"""Malformed model files fail fast with one line: config sizes checked against the tensors before anything is built
from them, safetensors headers validated field by field, GGUF headers checked before the reader loops over or sizes
anything by a claimed count."""

from __future__ import annotations

import shutil
import struct
import time

import gguf
import numpy as np
import pytest

from tests.weights.tiny_files import (edit_config, header, kv_value_offset, patch, rewrite_header, tensor_info_offsets,
                                      tiny_folder, tiny_gguf)
from tinylm.errors import ConfigError, TinyLMError, WeightsError
from tinylm.loading import load_model
from tinylm.weights.gguf_tokenizer import sentencepiece_merges


def _refused(path, error=TinyLMError, **kwargs) -> str:
    """The one-line message of loading `path`, which must fail with `error` within a second."""
    start = time.monotonic()
    with pytest.raises(error) as info:
        load_model(path, **kwargs)
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_folder(root / family, family) for family in ("llama", "qwen3_moe", "qwen3_next", "qed")}


@pytest.fixture()
def folder(base_folders, tmp_path):
    return shutil.copytree(base_folders["llama"], tmp_path / "llama")


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture()
def gguf_file(base_gguf, tmp_path):
    return shutil.copy(base_gguf, tmp_path / "tiny.gguf")


# --- config sizes against the tensors


def test_the_tiny_files_load(base_folders, base_gguf):
    for path in [*base_folders.values(), base_gguf]:
        assert load_model(path).model is not None


def test_huge_num_hidden_layers_is_refused_before_anything_is_built(folder):
    edit_config(folder, num_hidden_layers=1_000_000_000)
    assert "num_hidden_layers must be an integer in 1..4096, got 1000000000" in _refused(folder, ConfigError)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_num_hidden_layers_must_match_the_layers_in_the_file(folder, quantize):
    edit_config(folder, num_hidden_layers=3000)
    message = _refused(folder, WeightsError, quantize=quantize)
    assert "num_hidden_layers=3000 but the weights hold 2 layers" in message


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": 128}, "hidden_size=128"),
    ({"vocab_size": 100_000}, "vocab_size=100000"),
    ({"intermediate_size": 4096}, "intermediate_size=4096"),
    ({"num_attention_heads": 8, "num_key_value_heads": 8}, "num_attention_heads=8 x head_dim=16"),
    ({"head_dim": 4096}, "num_attention_heads=4 x head_dim=4096"),
    ({"num_key_value_heads": 4}, "num_key_value_heads=4 x head_dim=16"),
])
def test_each_size_is_checked_against_the_tensors(folder, changes, needle):
    edit_config(folder, **changes)
    message = _refused(folder, WeightsError)
    assert needle in message and "has shape" in message


def test_qed_errors_name_qeds_own_keys(base_folders, tmp_path):
    folder = shutil.copytree(base_folders["qed"], tmp_path / "qed")
    edit_config(folder, n_layers=5)
    assert "n_layers=5 but the weights hold 2 layers" in _refused(folder, WeightsError)
    edit_config(folder, n_layers=10**9)
    assert "n_layers must be an integer" in _refused(folder, ConfigError)


@pytest.mark.parametrize("experts, needle", [(64, "num_experts=64 but layer 0 holds 4 experts"),
                                             (3, "unexpected tensor 'model.layers.0.mlp.experts.3.")])
def test_expert_count_must_match_the_file(base_folders, tmp_path, experts, needle):
    folder = shutil.copytree(base_folders["qwen3_moe"], tmp_path / "moe")
    edit_config(folder, num_experts=experts)
    assert needle in _refused(folder, WeightsError)


def test_deltanet_sizes_are_checked(base_folders, tmp_path):
    folder = shutil.copytree(base_folders["qwen3_next"], tmp_path / "next")
    edit_config(folder, linear_num_value_heads=8)
    assert "linear_num_value_heads=8" in _refused(folder, WeightsError)


@pytest.mark.parametrize("changes, needle", [
    ({"max_position_embeddings": 10**12}, "max_position_embeddings must be an integer"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer"),
    ({"intermediate_size": 128.5}, "intermediate_size must be an integer"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling factor must be a positive"),
])
def test_config_values_out_of_bounds(folder, changes, needle):
    edit_config(folder, **changes)
    assert needle in _refused(folder, ConfigError)


def test_quantized_checkpoint_sizes_are_checked(folder, tmp_path):
    from tinylm.quant.checkpoint import save_quantized
    from tinylm.quant.policy import parse_policy

    saved = save_quantized(load_model(folder, quantize="int8").model, tmp_path / "q8", parse_policy("int8"))
    assert load_model(saved).model is not None
    edit_config(saved, num_hidden_layers=7)
    assert "num_hidden_layers=7 but the weights hold 2 layers" in _refused(saved, WeightsError)


# --- safetensors headers


def _edit_entry(folder, name, **fields):
    path = folder / "model.safetensors"
    data = header(path)
    data[name].update(fields)
    rewrite_header(path, data)


@pytest.mark.parametrize("fields, needle", [
    ({"data_offsets": ["0", "256"]}, "data_offsets must be two non-negative integers"),
    ({"data_offsets": [0]}, "data_offsets must be two non-negative integers"),
    ({"dtype": ["F32"]}, "dtype must be a string"),
    ({"dtype": "F33"}, "unknown dtype"),
    ({"shape": [-64]}, "non-negative integers"),
    ({"shape": [64.0]}, "non-negative integers"),
    ({"shape": [True] * 64}, "non-negative integers"),
    ({"shape": "64"}, "non-negative integers"),
    ({"shape": [[64]]}, "non-negative integers"),
], ids=["string offsets", "one offset", "list dtype", "unknown dtype", "negative shape", "fractional shape",
        "bool shape", "string shape", "nested shape"])
def test_malformed_entry_fields(folder, fields, needle):
    _edit_entry(folder, "model.norm.weight", **fields)
    message = _refused(folder, WeightsError)
    assert needle in message and "model.norm.weight" in message


def test_negative_dims_that_multiply_to_the_right_size(folder):
    entry = header(folder / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    rows, cols = entry["shape"]
    _edit_entry(folder, "model.layers.0.mlp.up_proj.weight", shape=[-rows, -cols])
    assert "non-negative integers" in _refused(folder, WeightsError)


def test_offsets_inside_another_tensor(folder):
    data = header(folder / "model.safetensors")
    first, second = sorted((n for n in data if n != "__metadata__"), key=lambda n: data[n]["data_offsets"][0])[:2]
    start, end = data[second]["data_offsets"]
    data[second]["data_offsets"] = [start - 4, end - 4]  # its first 4 bytes are the previous tensor's last
    rewrite_header(folder / "model.safetensors", data)
    assert "overlap" in _refused(folder, WeightsError)


def test_a_gap_or_a_tail_in_the_data(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    assert "bytes appended" in _refused(folder, WeightsError)


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                 b'{"x": ' + b"[" * 9 + b"]" * 9 + b"}"],
                         ids=["deep lists", "deep objects", "depth 10"])
def test_deeply_nested_header(folder, raw):
    rewrite_header(folder / "model.safetensors", raw)
    assert "nested deeper than" in _refused(folder, WeightsError)


def test_brackets_inside_strings_do_not_count_as_nesting(folder):
    path = folder / "model.safetensors"
    data = header(path)
    data["__metadata__"] = {"note": "[[[[[[[[[[[[ {{{{{{{{{{ \\\" ]]]"}
    rewrite_header(path, data)
    assert load_model(folder).model is not None


@pytest.mark.parametrize("raw, needle", [
    (b'{"model.norm.weight": 1}', "must be a JSON object"),
    (b'{"__metadata__": {"format": 1}}', "__metadata__ must map strings to strings"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', "a key appears twice"),
    (b"[]", "not a JSON object"),
    (b"\xff\xfe{", "corrupt safetensors header"),
])
def test_malformed_header_json(folder, raw, needle):
    rewrite_header(folder / "model.safetensors", raw)
    assert needle in _refused(folder, WeightsError)


def test_header_length_past_the_limit(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    assert "header length" in _refused(folder, WeightsError)


# --- GGUF headers


def test_huge_block_count_is_refused_at_once(gguf_file):
    patch(gguf_file, kv_value_offset(gguf_file, "llama.block_count"), 2_300_000_000, 4)
    message = _refused(gguf_file, ConfigError)
    assert "llama.block_count must be an integer in 1..4096, got 2300000000" in message


@pytest.mark.parametrize("key, value, needle", [
    ("llama.block_count", 3, "llama.block_count=3 but the weights hold 2 layers"),
    ("llama.block_count", 1, "unexpected tensor 'blk.1."),
    ("llama.embedding_length", 128, "llama.embedding_length=128"),
    ("llama.attention.head_count_kv", 4, "llama.attention.head_count_kv=4"),
    ("llama.feed_forward_length", 4096, "llama.feed_forward_length=4096"),
])
def test_gguf_sizes_are_checked_against_the_tensors(gguf_file, key, value, needle):
    patch(gguf_file, kv_value_offset(gguf_file, key), value, 4)
    assert needle in _refused(gguf_file, WeightsError)


def test_empty_metadata_key(tmp_path):
    path = tiny_gguf(tmp_path / "empty.gguf", extra_kv=lambda writer: writer.add_uint32("", 1))
    assert "empty metadata key" in _refused(path, WeightsError)


def test_nested_metadata_array(tmp_path):
    path = tiny_gguf(tmp_path / "nested.gguf", extra_kv=lambda writer: writer.add_array("x.nested", [[1, 2], [3]]))
    assert "nested array" in _refused(path, WeightsError)


@pytest.mark.parametrize("field, value, size, needle", [
    ("n_dims", 5, 4, "5 dims, at most 4"),
    ("dims", 0, 8, "a dim of 0"),
    ("dims", 2**62, 8, "needs more bytes than the file has"),
    ("dims", 2**32 + 64, 8, "needs more bytes than the file has"),
    ("type", 99, 4, "unknown type id 99"),
    ("offset", 0, 8, "overlap"),
    ("offset", 2**40, 8, "past its end"),
    ("offset", 3, 8, "not a multiple of the alignment"),
])
def test_bad_tensor_info(gguf_file, field, value, size, needle):
    patch(gguf_file, tensor_info_offsets(gguf_file, 3)[field], value, size)
    assert needle in _refused(gguf_file, WeightsError)


@pytest.mark.parametrize("offset, needle", [(8, "tensor count"), (16, "key/value count")])
def test_counts_the_file_cannot_hold(gguf_file, offset, needle):
    patch(gguf_file, offset, 10**6, 8)
    assert needle in _refused(gguf_file, WeightsError)


def test_array_and_string_lengths_past_the_end(gguf_file, tmp_path):
    tokens = kv_value_offset(gguf_file, "tokenizer.ggml.tokens")
    second = shutil.copy(gguf_file, tmp_path / "second.gguf")
    patch(gguf_file, tokens + 4, 2**40, 8)  # the array's length
    assert "claims 1099511627776 items" in _refused(gguf_file, WeightsError)
    patch(second, tokens + 12, 2**40, 8)  # the first token's length
    assert "past its end" in _refused(second, WeightsError)


def test_llama3_rope_factors_of_the_wrong_length(tmp_path):
    def add(writer):
        writer.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    path = tiny_gguf(tmp_path / "freqs.gguf", extra_kv=add)
    patch(path, kv_value_offset(path, "llama.rope.dimension_count"), 4096, 4)  # would size np.arange by it
    assert "rope_freqs.weight holds 4 RoPE factors" in _refused(path, ConfigError)


def test_sentencepiece_merges_of_a_huge_piece_are_bounded():
    start = time.monotonic()
    merges = sentencepiece_merges(["a" * 200_000, "a", "aa"], [0.0, -1.0, -0.5])
    assert time.monotonic() - start < 1.0 and merges == [("a", "a")]


def test_gguf_byte_helpers_find_the_fields(base_gguf):
    """The byte-patching helpers above assume the GGUF v3 layout; a failure here means they patch the wrong bytes."""
    data = base_gguf.read_bytes()
    offset = kv_value_offset(base_gguf, "llama.block_count")
    assert int.from_bytes(data[offset:offset + 4], "little") == 2
    tensor = gguf.GGUFReader(base_gguf).tensors[3]
    fields = tensor_info_offsets(base_gguf, 3)
    assert int.from_bytes(data[fields["n_dims"]:fields["n_dims"] + 4], "little") == len(tensor.shape)
    assert int.from_bytes(data[fields["type"]:fields["type"] + 4], "little") == int(tensor.tensor_type)
