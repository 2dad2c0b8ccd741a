"""`tinylm verify`: passes on every family's tiny model and on the built-in model (transformers run live), fails on a
checkpoint with one weight perturbed and names its layer, and says when there is nothing to compare with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next"])
def test_every_family_passes(capsys, tiny_folder, family):
    code, out, _ = run_cli(capsys, "verify", str(tiny_folder(family, 7)))
    assert code == 0 and out.rstrip().endswith("PASS"), out
    assert "ok    layers" in out and "ok    greedy" in out and "ok    tokenizer" in out


def test_the_built_in_model_passes(capsys, smollm2_gguf):
    """The Q4_1 GGUF, through transformers' own GGUF loader: tokenizer, chat template, layers, logits, tokens."""
    code, out, _ = run_cli(capsys, "verify", str(smollm2_gguf))
    assert code == 0 and out.rstrip().endswith("PASS"), out
    assert "ok    chat template: the same text" in out


def test_a_perturbed_weight_fails_and_names_its_layer(capsys, tiny_folder, tmp_path):
    """A copy of a checkpoint with one weight changed, checked against the original (--reference)."""
    original = tiny_folder("qwen3", 7)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in original.iterdir():
        if path.name != "SHA256SUMS":  # the checksums would (rightly) refuse the changed file
            (copy / path.name).write_bytes(path.read_bytes())
    weights = load_file(copy / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run_cli(capsys, "verify", str(copy), "--reference", str(original))
    assert code == 1 and "FAIL: layer 1 (model.layers.1)" in out, out
    assert "ok    layers" not in out and "ok    tokenizer" in out
    code, out, _ = run_cli(capsys, "verify", str(original), "--reference", str(original))
    assert code == 0, out


def test_qed_has_nothing_to_compare_with(capsys, tiny_folder):
    code, _, err = run_cli(capsys, "verify", str(tiny_folder("qed", 7)))
    assert code == 2 and "nothing to compare with" in err
