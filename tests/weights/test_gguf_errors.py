"""GGUF errors: truncated, corrupt or foreign files, unknown architectures and bad tensors give one-line errors
naming the problem; conversion refuses a folder holding other files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.weights.conftest import HEAD_DIM, HIDDEN, write_tiny
from tinylm.errors import ConfigError, WeightsError
from tinylm.weights.convert import convert_gguf_to_hf
from tinylm.weights.gguf import load_gguf, read_gguf_config


# --- broken files: one line, naming the problem


@pytest.fixture(scope="module")
def smol_bytes(smollm2_gguf):
    return smollm2_gguf.read_bytes()


def _patch(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(8, "little") + data[offset + 8:]


BROKEN = {
    "empty": lambda d: b"",
    "3 bytes": lambda d: d[:3],
    "header only": lambda d: d[:24],
    "cut in metadata": lambda d: d[:400],
    "cut in token list": lambda d: d[:1_000_000],
    "cut in tensor data": lambda d: d[:len(d) // 2],
    "last byte missing": lambda d: d[:-1],
    "flipped magic": lambda d: b"FUGG" + d[4:100_000],
    "garbage": lambda d: np.random.default_rng(0).bytes(4096),
    "magic then garbage": lambda d: b"GGUF" + np.random.default_rng(0).bytes(4096),
    "bad version": lambda d: d[:4] + (99).to_bytes(4, "little") + d[8:100_000],
    "huge kv count": lambda d: _patch(d[:2_000_000], 16, 2**62),
    "huge key length": lambda d: _patch(d, 24, 2**40),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_gives_one_line(tmp_path, smol_bytes, case):
    path = tmp_path / "broken.gguf"
    path.write_bytes(BROKEN[case](smol_bytes))
    with pytest.raises(WeightsError) as err:
        load_gguf(path)
    message = str(err.value)
    assert "\n" not in message and "broken.gguf" in message
    assert any(word in message for word in ("truncated", "not a GGUF", "corrupt")), message


def test_unknown_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_uint32("mamba.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for read in (load_gguf, read_gguf_config):
        with pytest.raises(ConfigError, match="'mamba'") as err:
            read(tmp_path / "m.gguf")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"drop": ("blk.0.ffn_up.weight",)}, "missing tensors model.layers.0.mlp.up_proj.weight"),
    ({"extra": {"blk.0.attn_foo.weight": (4, HIDDEN)}}, "unexpected tensor 'blk.0.attn_foo.weight'"),
    ({"extra": {"blk.1.attn_norm.weight": (HIDDEN,)}}, "unexpected tensor 'blk.1.attn_norm.weight'"),
    ({"extra": {"blk.0.attn_k.weight": (HEAD_DIM, HIDDEN)}}, "'blk.0.attn_k.weight' has shape (128, 512)"),
    ({"qtype": Q.IQ4_NL}, "type IQ4_NL"),
], ids=["missing", "unexpected", "extra layer", "shape", "type"])
def test_bad_tensors(tmp_path, kwargs, needle):
    write_tiny(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(WeightsError) as err:
        load_gguf(tmp_path / "m.gguf")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_convert_refuses_a_folder_with_other_files(tmp_path):
    write_tiny(tmp_path / "m.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="model-00001-of-00002"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
