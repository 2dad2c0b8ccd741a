"""Bad checkpoints give one clear WeightsError naming the problem; good ones load and round-trip with a manifest."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import transformers

import tinylm
from tinylm.errors import ConfigError, WeightsError
from tinylm.weights import safetensors_io


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


def _error(folder) -> str:
    with pytest.raises(WeightsError) as info:
        tinylm.load(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_checkpoint_loads(checkpoint):
    assert tinylm.load(checkpoint).config.model_type == "qwen2"


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in _error(checkpoint)


def test_file_shorter_than_its_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert "header length" in _error(checkpoint)


def test_offsets_run_past_the_file(checkpoint):
    def grow(header):
        name = "model.norm.weight"
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + 10**9, end + 10**9]
    _rewrite_header(checkpoint / "model.safetensors", grow)
    message = _error(checkpoint)
    assert "model.norm.weight" in message and "run past" in message


def test_overlapping_tensors(checkpoint):
    def overlap(header):
        a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
        header[b]["data_offsets"] = header[a]["data_offsets"]
    _rewrite_header(checkpoint / "model.safetensors", overlap)
    assert "overlap" in _error(checkpoint)


def test_shape_that_does_not_fit_the_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 40
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = _error(checkpoint)
    assert "model.layers.0.mlp." in message and "48" in message and "40" in message


def test_missing_tensor(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = _error(checkpoint)
    assert "missing" in message and "model.layers.2." in message


def test_unexpected_tensor(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = _error(checkpoint)
    assert "unexpected" in message and "model.layers.1." in message


def test_integer_weights_are_refused(checkpoint, tmp_path):
    state = {k: v.clone() for k, v in tinylm.load(checkpoint).model.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    safetensors_io.save_checkpoint(checkpoint, state)
    assert "dtype I32" in _error(checkpoint)


def test_pickle_only_folder_is_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    assert "never loads pickle" in _error(checkpoint)


def test_manifest_written_on_export_and_verified(checkpoint, tmp_path):
    from tinylm.weights.export import export_hf_folder

    checkpoint = export_hf_folder(tinylm.load(checkpoint).model, tmp_path / "exported")
    manifest = (checkpoint / "SHA256SUMS").read_text()
    assert "model.safetensors" in manifest and "config.json" in manifest
    reloaded = tinylm.load(checkpoint)  # verifies cleanly
    assert reloaded.config.model_type == "qwen2"
    assert transformers.AutoModelForCausalLM.from_pretrained(checkpoint) is not None
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: shape checks cannot see it, the manifest can
    path.write_bytes(bytes(data))
    assert "SHA-256" in _error(checkpoint)


@pytest.mark.parametrize("edit, words", [
    ({"model_type": "mamba"}, "unknown architecture"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unsupported RoPE"),
    ({"rope_scaling": {"type": "llama3", "factor": 2.0}}, "needs"),
])
def test_unknown_or_inconsistent_config(checkpoint, edit, words):
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(edit)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words):
        tinylm.load(checkpoint)
