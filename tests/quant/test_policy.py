"""Policies by name and options; bad ones give one-line errors, from Python and from the command line;
`tinylm quantize` writes a checkpoint and, with --check, runs the quality gate."""

from __future__ import annotations

import pytest
import torch

import tinylm
from tinylm.cli import main
from tinylm.errors import ConfigError
from tinylm.quant.policy import BUILTIN, QuantPolicy, parse_policy
from tinylm.quant.quality import Gate, distribution_metrics, evaluate


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return tiny_folder("qwen2", 2)


def test_parse_names_aliases_and_options():
    assert parse_policy("int4") == BUILTIN["int4"]
    assert parse_policy("qkvfp16").name == "qkv-fp16" and parse_policy("tiedq").name == "int4-tiedq"
    policy = parse_policy("int4:group_size=128, head-chunk=8192,kernel_dtype=model")
    assert (policy.group_size, policy.head_chunk, policy.kernel_dtype) == (128, 8192, "model")
    assert parse_policy(policy.spec) == policy and policy.spec == "int4:group_size=128,head_chunk=8192,kernel_dtype=model"
    assert QuantPolicy.from_dict(policy.to_dict()) == policy
    qkv = parse_policy("qkv-fp16")
    assert qkv.scheme_for("model.layers.3.self_attn.k_proj") == "fp16"
    assert qkv.scheme_for("model.layers.3.self_attn.o_proj") == "int4"
    assert qkv.scheme_for("model.layers.3.mlp.gate") == "float"  # MoE routers stay float under every policy


@pytest.mark.parametrize("spec, message", [
    ("int3", "unknown quantization policy 'int3' (known: int8, w8a8, int4, int4-tiedq, qkv-fp16)"),
    ("int4:group_size=48", "group_size must be one of 32, 64, 128, 256, got 48"),
    ("int4:group_size=big", "group_size must be an integer, got 'big'"),
    ("int4:colour=red", "bad option 'colour=red'"),
    ("int4:head_chunk=100", "head_chunk must be a multiple of 64"),
    ("int8:kernel_dtype=int8", "kernel_dtype must be one of auto, model, bfloat16, float32"),
    ("", "quantize must be a policy name"),
])
def test_bad_policies_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_shape_errors_come_before_any_weight_is_read(tiny):
    with pytest.raises(ConfigError, match="int4 group size 128 does not divide in_features 64 of "
                                          "model.embed_tokens|int4 group size 128 does not divide in_features 64"):
        tinylm.load(tiny, quantize="int4:group_size=128")
    with pytest.raises(ConfigError, match="CPU kernels; device 'meta' is not a CPU"):
        tinylm.load(tiny, device="meta", quantize="int8")


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{tiny}", "{out}", "--policy", "int5"], "unknown quantization policy 'int5'"),
    (["quantize", "{tiny}", "{out}", "--policy", "int4", "--group-size", "128"], "does not divide in_features 64"),
    (["generate", "--model", "{tiny}", "--quantize", "int4:x=1", "Hi"], "bad option 'x=1'"),
])
def test_cli_errors_are_one_line(tiny, tmp_path, capsys, argv, message):
    argv = [a.format(tiny=tiny, out=tmp_path / "out") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("tinylm: error:")


def test_cli_quantize_writes_a_checkpoint_and_checks_it(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny), str(out), "--policy", "qkv-fp16", "--group-size", "32", "--dtype",
                 "float32", "--check"])
    printed = capsys.readouterr().out
    assert f"wrote {out} (tinylm, policy qkv-fp16:group_size=32" in printed
    report = evaluate(tinylm.load(tiny), tinylm.load(out), "qkv-fp16:group_size=32")
    assert report.line() in printed and code == (0 if report.passed else 1)
    assert tinylm.load(out).config.model_type == "qwen2"
    assert main(["quantize", str(tiny), str(out)]) == 1  # never writes over a folder
    assert "exists and is not empty" in capsys.readouterr().err


def test_quality_metrics_and_gate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    targets = torch.randint(0, 50, (5,), generator=g)
    same = distribution_metrics(logits, logits, targets)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1 and same["ppl"] == same["ppl_reference"]
    other = distribution_metrics(logits, logits + torch.randn(6, 50, generator=g), targets)
    assert other["kl"] > 0.1 and other["top1"] < 1

    class Fake:  # an LLM stand-in: same tokenizer, logits with or without noise
        config = type("C", (), {"max_position_embeddings": 100})

        def __init__(self, noise):
            self.noise = noise

        def encode(self, text):
            return [1, 2, 3, 4, 5, 6]

        def forward(self, ids):
            return type("O", (), {"logits": (logits + self.noise)[None]})

    report = evaluate(Fake(0), Fake(torch.randn(6, 50, generator=g)), "custom", gate=Gate(0.01, 0.99, 0.01))
    assert not report.passed and "FAIL: KL" in report.line()
    assert evaluate(Fake(0), Fake(0), "int8").passed
