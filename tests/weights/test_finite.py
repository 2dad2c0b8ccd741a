"""Weights holding NaN or Inf are refused at load, naming the tensor, on every load path; check_finite=False skips
the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.weights.tiny_files import HIDDEN, INTER, tiny_folder, tiny_gguf
from tinylm.errors import WeightsError
from tinylm.loading import load_model
from tinylm.weights import finite

UP = "model.layers.0.mlp.up_proj.weight"


def _poison(folder, name: str, value: float, index=(3, 5)) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name][index] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _refused(path, **kwargs) -> str:
    with pytest.raises(WeightsError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "NaN or Inf" in message and "check_finite=False" in message
    return message


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("nan") / "llama")
    _poison(folder, UP, float("nan"))
    return folder


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "bfloat16"}, {"quantize": "int8"}, {"quantize": "int4"},
                                    {"quantize": "w8a8"}],
                         ids=["float32", "bfloat16", "int8 while loading", "int4 while loading", "w8a8"])
def test_nan_weights_are_refused_naming_the_tensor(nan_folder, kwargs):
    assert _refused(nan_folder, **kwargs).startswith(f"{UP} holds NaN or Inf values (corrupt checkpoint?)")


@pytest.mark.parametrize("kwargs", [{}, {"quantize": "int8"}])
def test_check_finite_false_skips_the_check(nan_folder, kwargs):
    loaded = load_model(nan_folder, check_finite=False, **kwargs)
    if not kwargs:
        assert torch.isnan(loaded.model.get_parameter(UP)).any()


def test_inf_from_a_float16_cast_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "llama")
    _poison(folder, "model.norm.weight", 1e6, index=(0,))  # finite in float32, Inf once cast to float16
    assert load_model(folder).model is not None
    assert _refused(folder, dtype="float16").startswith("model.norm.weight ")


def test_gguf_inf_weights(tmp_path):
    path = tiny_gguf(tmp_path / "inf.gguf", values={"blk.1.ffn_down.weight": np.full((HIDDEN, INTER), np.inf,
                                                                                       np.float32)})
    for kwargs in ({}, {"quantize": "int8"}):
        assert _refused(path, **kwargs).startswith("model.layers.1.mlp.down_proj.weight ")
    assert load_model(path, check_finite=False).model is not None


def test_gguf_q8_0_blocks_with_nan_scales_taken_as_they_are(tmp_path):
    path = tiny_gguf(tmp_path / "nan.gguf", values={"blk.0.attn_q.weight": np.full((HIDDEN, HIDDEN), np.nan,
                                                                                    np.float32)})
    assert "model.layers.0.self_attn.q_proj.weight" in _refused(path)
    assert "(scales)" in _refused(path, quantize="int8")  # the stored Q8_0 blocks are kept: their scales are NaN


def test_quantized_checkpoint_with_nan(tmp_path):
    from tinylm.quant.checkpoint import save_quantized
    from tinylm.quant.policy import parse_policy

    model = load_model(tiny_folder(tmp_path / "llama"), quantize="int8").model
    saved = save_quantized(model, tmp_path / "q8", parse_policy("int8"))
    (saved / "SHA256SUMS").unlink()
    _poison(saved, "model.norm.weight", float("inf"), index=(0,))
    assert _refused(saved).startswith("model.norm.weight ")
    assert load_model(saved, check_finite=False).model is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_anywhere_is_found(dtype, bad):
    values = torch.zeros(3, 100, dtype=dtype)
    finite.check_finite("t", values)
    for index in ((0, 0), (1, 57), (2, 99)):
        spoiled = values.clone()
        spoiled[index] = bad
        with pytest.raises(WeightsError, match="^t holds NaN or Inf"):
            finite.check_finite("t", spoiled)
    finite.check_finite("empty", torch.zeros(0, dtype=dtype))
    finite.check_finite("ints", torch.zeros(4, dtype=torch.int8))  # integers cannot hold NaN
